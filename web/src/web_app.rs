//! The desktop app in the page: applies `window.dtopp`'s requests before each frame and
//! publishes the status after each step.

use std::cell::RefCell;
use std::rc::Rc;

use dtopp_desktop::DesktopApp;
use dtopp_desktop::run_data::StepPoint;
use eframe::egui::Ui;
use serde_json::Value;

use crate::commands::Commands;
use crate::status::{dtopp_steps, status};

/// What the page's script reads between frames.
#[derive(Debug, Default)]
pub struct Published {
    /// The last status object (`None` before the first step).
    pub status: Option<Value>,
    /// The DTop-p run's steps.
    pub steps: Vec<StepPoint>,
}

/// The app, the request queue and where the status goes.
#[derive(Debug)]
pub struct WebApp {
    app: DesktopApp,
    commands: Rc<RefCell<Commands>>,
    published: Rc<RefCell<Published>>,
    status_element: Option<web_sys::Element>,
}

impl WebApp {
    /// Wraps `app`; `status_element` receives the status JSON as its text.
    pub fn new(
        app: DesktopApp,
        commands: Rc<RefCell<Commands>>,
        published: Rc<RefCell<Published>>,
        status_element: Option<web_sys::Element>,
    ) -> Self {
        Self {
            app,
            commands,
            published,
            status_element,
        }
    }

    fn publish(&mut self) {
        let steps = dtopp_steps(&self.app);
        let mut published = self.published.borrow_mut();
        let changed = steps.len() != published.steps.len()
            || steps.last().map(|s| s.step) != published.steps.last().map(|s| s.step);
        if !changed {
            return;
        }
        // The run grows step by step, or starts over after a reset.
        let have = published.steps.len();
        let grew = steps.len() > have
            && (have == 0 || steps[have - 1].step == published.steps[have - 1].step);
        if grew {
            published.steps.extend_from_slice(&steps[have..]);
        } else {
            published.steps = steps.to_vec();
        }
        published.status = status(&self.app, "webgpu");
        let text = published
            .status
            .as_ref()
            .map_or_else(|| "{}".to_string(), Value::to_string);
        if let Some(element) = &self.status_element {
            element.set_text_content(Some(&text));
        }
    }
}

impl eframe::App for WebApp {
    fn ui(&mut self, ui: &mut Ui, _frame: &mut eframe::Frame) {
        self.commands.borrow_mut().apply(&mut self.app);
        self.app.draw(ui);
        self.publish();
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::App::save(&mut self.app, storage);
    }
}
