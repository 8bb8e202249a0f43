//! `dtopp orchestrate --port P`: burn-collective's global orchestrator on `P`, and dtopp's
//! supervision of the nodes on `P + 1`, until every node has finished.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::{HEARTBEAT, Hello, LineReader, Read1, SILENCE_LIMIT, one_line};
use crate::error::{Error, Result};
use crate::train::nodes::supervisor_port;

/// What `dtopp orchestrate` is given.
#[derive(Clone, Debug)]
pub struct OrchestrateOptions {
    /// burn's orchestrator listens here (`ws://HOST:PORT` for the nodes); the supervision
    /// on the next port.
    pub port: u16,
    /// How long the nodes have to join, from the start.
    pub join_timeout: Duration,
    /// Abort the run when no node finishes a step for this long.
    pub stall_timeout: Duration,
    /// Print what happens (stderr).
    pub progress: bool,
}

/// Runs the orchestrator until every node that joined has finished: `Ok` when all
/// trained to the end; otherwise the error names the node that failed, died, was refused
/// or never came, and every other node has been told to stop.
pub fn orchestrate(options: &OrchestrateOptions) -> Result<()> {
    let say = |line: String| {
        if options.progress {
            eprintln!("orchestrate: {line}");
        }
    };
    let port = options.port;
    let supervision_port = supervisor_port(port).ok_or_else(|| {
        Error::param(
            "--port",
            port,
            "below 65535 (the supervision listens on the next port)",
        )
    })?;
    // burn's server logs a bind failure and returns; binding here first gives the error.
    drop(listen(port, "--port")?);
    let listener = listen(supervision_port, "--port (plus one)")?;
    start_burn_orchestrator(port)?;
    say(format!(
        "burn's global orchestrator on ws://0.0.0.0:{port}, dtopp's supervision on port {supervision_port}; waiting up to {} s for the nodes",
        options.join_timeout.as_secs()
    ));
    let (events, inbox) = mpsc::channel();
    std::thread::Builder::new()
        .name("dtopp-supervision-accept".into())
        .spawn(move || accept(listener, events))
        .map_err(|e| Error::Cluster(format!("cannot start the supervision: {e}")))?;
    Supervisor::new(options, &say).run(&inbox)
}

fn listen(port: u16, flag: &'static str) -> Result<TcpListener> {
    TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
        Error::param(
            flag,
            port,
            format!("a free port: binding {port} failed ({e})"),
        )
    })
}

fn start_burn_orchestrator(port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Cluster(format!("cannot start the orchestrator's runtime: {e}")))?;
    std::thread::Builder::new()
        .name("burn-orchestrator".into())
        .spawn(move || runtime.block_on(burn_collective::start_global_orchestrator(port)))
        .map(drop)
        .map_err(|e| Error::Cluster(format!("cannot start burn's orchestrator: {e}")))
}

/// What the connection threads report.
enum Event {
    Connected(usize, TcpStream),
    Line(usize, String),
    Closed(usize, String),
}

fn accept(listener: TcpListener, events: Sender<Event>) {
    for (id, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let (Ok(writer), Ok(mut reader)) = (
            stream.try_clone(),
            LineReader::new(stream, Duration::from_secs(3600)),
        ) else {
            continue;
        };
        if events.send(Event::Connected(id, writer)).is_err() {
            return;
        }
        let events = events.clone();
        let _ = std::thread::Builder::new()
            .name(format!("dtopp-supervision-{id}"))
            .spawn(move || {
                loop {
                    let event = match reader.next() {
                        Read1::Line(line) => Event::Line(id, line),
                        Read1::Quiet => continue,
                        Read1::Closed(how) => Event::Closed(id, how),
                    };
                    let closed = matches!(event, Event::Closed(..));
                    if events.send(event).is_err() || closed {
                        return;
                    }
                }
            });
    }
}

/// One connection: a node once it said hello.
struct Connection {
    writer: TcpStream,
    hello: Option<Hello>,
    heard: Instant,
    done: bool,
}

struct Supervisor<'a> {
    options: &'a OrchestrateOptions,
    say: &'a dyn Fn(String),
    connections: HashMap<usize, Connection>,
    /// Joined nodes by node rank: their connection.
    nodes: BTreeMap<usize, usize>,
    /// Nodes that reported their successful end.
    finished: BTreeSet<usize>,
    reference: Option<Hello>,
    started: Option<Instant>,
    begun: Instant,
    step: u64,
    progressed: Instant,
}

impl<'a> Supervisor<'a> {
    fn new(options: &'a OrchestrateOptions, say: &'a dyn Fn(String)) -> Self {
        Self {
            options,
            say,
            connections: HashMap::new(),
            nodes: BTreeMap::new(),
            finished: BTreeSet::new(),
            reference: None,
            started: None,
            begun: Instant::now(),
            step: 0,
            progressed: Instant::now(),
        }
    }

    fn run(mut self, inbox: &mpsc::Receiver<Event>) -> Result<()> {
        let mut beat = Instant::now();
        loop {
            match inbox.recv_timeout(HEARTBEAT) {
                Ok(event) => {
                    if let Some(end) = self.handle(event) {
                        return end;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Cluster("the supervision listener stopped".into()));
                }
            }
            if beat.elapsed() >= HEARTBEAT {
                beat = Instant::now();
                self.send_all("beat");
            }
            if let Some(why) = self.overdue() {
                return self.abort(None, why);
            }
        }
    }

    fn handle(&mut self, event: Event) -> Option<Result<()>> {
        match event {
            Event::Connected(id, writer) => {
                self.connections.insert(
                    id,
                    Connection {
                        writer,
                        hello: None,
                        heard: Instant::now(),
                        done: false,
                    },
                );
                None
            }
            Event::Line(id, line) => {
                let connection = self.connections.get_mut(&id)?;
                connection.heard = Instant::now();
                let (word, rest) = line.split_once(' ').unwrap_or((&line, ""));
                match word {
                    "hello" => self.hello(id, rest),
                    "beat" => {
                        let step = rest.trim().parse().unwrap_or(0);
                        if step > self.step {
                            self.step = step;
                            self.progressed = Instant::now();
                        }
                        None
                    }
                    "done" => self.done(id, rest),
                    _ => None,
                }
            }
            Event::Closed(id, how) => {
                let connection = self.connections.remove(&id)?;
                match connection.hello {
                    Some(hello) if !connection.done => {
                        self.nodes.remove(&hello.node);
                        let why = format!(
                            "node {} ({}) disconnected before finishing ({how}): it was killed, crashed or lost its network",
                            hello.node, hello.data_address
                        );
                        Some(self.abort(None, why))
                    }
                    _ => None,
                }
            }
        }
    }

    fn hello(&mut self, id: usize, words: &str) -> Option<Result<()>> {
        let Some(hello) = Hello::parse(words) else {
            let why = format!("a connection sent a malformed hello: {words:?}");
            return Some(self.abort(Some(id), why));
        };
        let reference = self.reference.get_or_insert_with(|| hello.clone()).clone();
        let problem = hello.mismatch(&reference).or_else(|| {
            if self.nodes.contains_key(&hello.node) {
                Some(format!("two processes joined as node {}", hello.node))
            } else if self.started.is_some() {
                Some(format!(
                    "node {} joined after the run had started",
                    hello.node
                ))
            } else {
                None
            }
        });
        if let Some(why) = problem {
            if let Some(c) = self.connections.get_mut(&id) {
                let _ = writeln!(c.writer, "refuse {}", one_line(&why));
            }
            let why = format!("refused: {why}");
            return Some(self.abort(Some(id), why));
        }
        (self.say)(format!(
            "node {} of {} joined ({}, {} local rank(s))",
            hello.node, hello.nodes, hello.data_address, hello.local_world
        ));
        self.nodes.insert(hello.node, id);
        let all = hello.nodes;
        if let Some(c) = self.connections.get_mut(&id) {
            c.hello = Some(hello);
        }
        if self.nodes.len() == all {
            (self.say)(format!("all {all} nodes joined; training"));
            self.started = Some(Instant::now());
            self.progressed = Instant::now();
            self.send_all("go");
        }
        None
    }

    fn done(&mut self, id: usize, words: &str) -> Option<Result<()>> {
        let connection = self.connections.get_mut(&id)?;
        let node = connection.hello.as_ref()?.node;
        connection.done = true;
        if let Some(message) = words.strip_prefix("error ") {
            let why = format!("node {node} failed: {message}");
            return Some(self.abort(Some(id), why));
        }
        (self.say)(format!("node {node} finished"));
        self.finished.insert(node);
        let expected = self.reference.as_ref().map_or(usize::MAX, |h| h.nodes);
        if self.finished.len() == expected {
            (self.say)(format!("all {expected} nodes finished"));
            return Some(Ok(()));
        }
        None
    }

    /// Why the run must stop now, if it must: a node silent for too long, nodes missing
    /// at the join deadline, or no step finished for the stall timeout.
    fn overdue(&self) -> Option<String> {
        for c in self.connections.values() {
            if let Some(hello) = &c.hello
                && !c.done
                && c.heard.elapsed() > SILENCE_LIMIT
            {
                return Some(format!(
                    "node {} ({}) sent no heartbeat for {} s: its host hangs or its network dropped",
                    hello.node,
                    hello.data_address,
                    SILENCE_LIMIT.as_secs()
                ));
            }
        }
        match self.started {
            None if self.begun.elapsed() > self.options.join_timeout => {
                let expected = self.reference.as_ref().map(|h| h.nodes);
                let missing: Vec<String> = match expected {
                    Some(n) => (0..n)
                        .filter(|r| !self.nodes.contains_key(r))
                        .map(|r| r.to_string())
                        .collect(),
                    None => vec!["all".into()],
                };
                Some(format!(
                    "node(s) {} did not join within {} s (--join-timeout)",
                    missing.join(", "),
                    self.options.join_timeout.as_secs()
                ))
            }
            Some(_) if self.progressed.elapsed() > self.options.stall_timeout => Some(format!(
                "no node finished a step for {} s (--stall-timeout); the last was step {}",
                self.options.stall_timeout.as_secs(),
                self.step
            )),
            _ => None,
        }
    }

    /// Tells every node but `except` to stop with `why`, gives them a moment to read it,
    /// and returns the error.
    fn abort(&mut self, except: Option<usize>, why: String) -> Result<()> {
        (self.say)(format!("stopping the run: {why}"));
        let line = format!("abort {}", one_line(&why));
        for (id, c) in &mut self.connections {
            if Some(*id) != except && !c.done {
                let _ = writeln!(c.writer, "{line}");
            }
        }
        // Closing a socket whose peer has unread data can reset the connection and drop
        // the abort in flight; the nodes exit on reading it.
        std::thread::sleep(Duration::from_millis(500));
        Err(Error::Cluster(why))
    }

    fn send_all(&mut self, line: &str) {
        for c in self.connections.values_mut() {
            let _ = writeln!(c.writer, "{line}");
        }
    }
}
