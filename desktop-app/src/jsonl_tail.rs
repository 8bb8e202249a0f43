//! Following a JSON-lines file that another process is still writing: each poll returns
//! the lines completed since the last one. A last line without its newline is left for
//! the next poll (the writer is mid-line), so a reader never parses half a record.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Read position in one growing file.
#[derive(Debug)]
pub struct JsonlTail {
    path: PathBuf,
    offset: u64,
    line_number: usize,
    pending: Vec<u8>,
}

/// A complete line and its 1-based number in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number.
    pub number: usize,
    /// The text, without the newline.
    pub text: String,
}

impl JsonlTail {
    /// Starts at the beginning of `path` (which need not exist yet).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            line_number: 0,
            pending: Vec::new(),
        }
    }

    /// The file followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines completed since the last poll. A missing file is no lines (a run that has
    /// not written yet); a file that shrank was rewritten, so it is read from the start
    /// and `restarted` is set.
    pub fn poll(&mut self) -> std::io::Result<Polled> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Polled::default()),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let mut restarted = false;
        if len < self.offset {
            self.offset = 0;
            self.line_number = 0;
            self.pending.clear();
            restarted = true;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut fresh = Vec::new();
        file.take(len - self.offset).read_to_end(&mut fresh)?;
        self.offset += fresh.len() as u64;
        self.pending.extend_from_slice(&fresh);

        let mut lines = Vec::new();
        let complete = match self.pending.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => return Ok(Polled { lines, restarted }),
        };
        let chunk: Vec<u8> = self.pending.drain(..complete).collect();
        // `chunk` ends with its newline: without it, splitting yields exactly its lines.
        for raw in chunk[..chunk.len() - 1].split(|&b| b == b'\n') {
            self.line_number += 1;
            let text = String::from_utf8_lossy(raw)
                .trim_end_matches('\r')
                .to_string();
            if text.trim().is_empty() {
                continue;
            }
            lines.push(Line {
                number: self.line_number,
                text,
            });
        }
        Ok(Polled { lines, restarted })
    }
}

/// What one poll found.
#[derive(Debug, Default)]
pub struct Polled {
    /// Complete lines, in order.
    pub lines: Vec<Line>,
    /// The file was rewritten from scratch; earlier lines no longer apply.
    pub restarted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn returns_whole_lines_and_keeps_a_partial_last_line() {
        let dir = std::env::temp_dir().join(format!("dtopp-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut tail = JsonlTail::new(&path);
        assert!(tail.poll().unwrap().lines.is_empty());

        let mut f = File::create(&path).unwrap();
        f.write_all(b"{\"a\":1}\n{\"a\":2}\n{\"a\"").unwrap();
        f.flush().unwrap();
        let got = tail.poll().unwrap().lines;
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].number, 2);

        f.write_all(b":3}\n\n{\"a\":4}\n").unwrap();
        f.flush().unwrap();
        let got = tail.poll().unwrap().lines;
        assert_eq!(
            got,
            vec![
                Line {
                    number: 3,
                    text: "{\"a\":3}".into()
                },
                Line {
                    number: 5,
                    text: "{\"a\":4}".into()
                }
            ]
        );

        std::fs::write(&path, b"{\"b\":1}\n").unwrap();
        let polled = tail.poll().unwrap();
        assert!(polled.restarted);
        assert_eq!(polled.lines[0].number, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
