//! Requests from the page's script (`window.dtopp`), queued until the next frame, when
//! the app applies them: a script runs between frames and must not touch the app while
//! it draws.

use dtopp_desktop::DesktopApp;
use dtopp_desktop::app::step_change;

/// One request.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Set `T`.
    SetTarget(f64),
    /// The step change of the simulator's button.
    StepChange,
    /// Start the simulation over.
    Reset,
    /// Run or pause.
    Run(bool),
}

/// The queue, and what validation needs to know about the app.
#[derive(Debug, Default)]
pub struct Commands {
    queue: Vec<Command>,
    experts: usize,
}

impl Commands {
    /// Queues a new target after checking it against the simulator's `E`.
    pub fn set_target(&mut self, target: f64) -> Result<(), String> {
        let experts = self.experts.max(1);
        if !(target.is_finite() && target >= 1.0 && target <= experts as f64) {
            return Err(format!(
                "setTarget({target}): the target must be a number of experts in [1, {experts}] (E = {experts})"
            ));
        }
        self.queue.push(Command::SetTarget(target));
        Ok(())
    }

    /// Queues a request that needs no checking.
    pub fn push(&mut self, command: Command) {
        self.queue.push(command);
    }

    /// Applies the queued requests to `app`, in order.
    pub fn apply(&mut self, app: &mut DesktopApp) {
        for command in self.queue.drain(..) {
            match command {
                Command::SetTarget(t) => app.settings_mut().sim.target = t,
                Command::StepChange => {
                    let sim = &mut app.settings_mut().sim;
                    sim.target = step_change(sim.target, sim.experts);
                }
                Command::Reset => app.reset_simulator(),
                Command::Run(running) => {
                    if let Some(sim) = app.simulator_mut() {
                        sim.running = running;
                    }
                }
            }
        }
        self.experts = app.settings().sim.experts;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtopp_desktop::StartOptions;
    use dtopp_desktop::settings::Settings;

    #[test]
    fn targets_are_checked_against_the_experts_and_applied_in_order() {
        let mut app = DesktopApp::with_settings(Settings::default(), StartOptions::default());
        let mut commands = Commands::default();
        commands.apply(&mut app);
        assert_eq!(commands.experts, 64);
        for bad in [0.5, 65.0, f64::NAN, f64::INFINITY] {
            let e = commands.set_target(bad).unwrap_err();
            assert!(e.contains("[1, 64]"), "{e}");
        }
        commands.set_target(12.0).unwrap();
        commands.push(Command::StepChange);
        commands.apply(&mut app);
        // 12 -> 6 (doubling would pass E / 4 = 16).
        assert_eq!(app.settings().sim.target, 6.0);
    }
}
