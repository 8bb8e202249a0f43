//! Frame timing: the UI's frames per second over the last couple of seconds, shown in
//! the status bar and printed by `--exit-after`.

use std::collections::VecDeque;
use web_time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(2);

/// Recent frame times.
#[derive(Debug, Default)]
pub struct FrameStats {
    frames: VecDeque<Instant>,
    total_frames: u64,
    longest: Duration,
    first: Option<Instant>,
}

impl FrameStats {
    /// Records a frame starting now.
    pub fn frame(&mut self) {
        let now = Instant::now();
        if let Some(&last) = self.frames.back() {
            self.longest = self.longest.max(now - last);
        }
        self.first.get_or_insert(now);
        self.frames.push_back(now);
        self.total_frames += 1;
        while self
            .frames
            .front()
            .is_some_and(|&t| now.duration_since(t) > WINDOW)
        {
            self.frames.pop_front();
        }
    }

    /// Frames per second over the window (0 before two frames).
    pub fn fps(&self) -> f64 {
        match (self.frames.front(), self.frames.back()) {
            (Some(&a), Some(&b)) if b > a => (self.frames.len() - 1) as f64 / (b - a).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Mean frames per second since the first frame, the longest frame gap, frames.
    pub fn overall(&self) -> (f64, Duration, u64) {
        let seconds = self.first.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let fps = if seconds > 0.0 {
            self.total_frames as f64 / seconds
        } else {
            0.0
        };
        (fps, self.longest, self.total_frames)
    }
}
