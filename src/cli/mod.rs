//! The command line every app gets: `worker`, the app's own commands, and global options.

mod ops;

use crate::app::Signals;
use crate::app::{discovery, App, Role};
use crate::error::{Error, Result};
use clap::Arg;
use std::ffi::OsString;

/// The arguments of a command that takes none:
///
/// ```no_run
/// use rill::prelude::*;
///
/// let app = App::new("hello");
/// app.command("hello", |_: NoArgs| async {
///     println!("hello");
///     Ok::<_, rill::Error>(())
/// });
/// app.main()
/// ```
///
/// (Its own description is not the command's: a command described in `--help` takes an
/// empty `clap::Args` struct of its own, documented.)
#[derive(Debug, Clone, Copy, Default, clap::Args)]
#[command(about = None, long_about = None)]
pub struct NoArgs {}

/// Log levels `-l/--loglevel` accepts, in any case: Faust's (Python's) names and tracing's.
const LEVELS: [&str; 9] = [
    "critical", "crit", "fatal", "error", "warning", "warn", "info", "debug", "trace",
];

/// The commands every app has; an app's own command may not take one of these names.
/// The broker of [`Settings::default`](crate::Settings): what the `worker` command takes to mean
/// "embedded, durable in the data directory".
const DEFAULT_BROKER: &str = "memory://";

pub(crate) const BUILT_IN: [&str; 6] = ["worker", "reset", "send", "agents", "tables", "help"];

impl App {
    fn cli(&self) -> clap::Command {
        // Usage lines name the program as it was run (`myapp worker`), not the app id.
        let program = self
            .program
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| self.id().to_owned());
        let mut cmd = clap::Command::new(program)
            .about(format!("rill app {:?}", self.id()))
            // `myapp --version` prints `myapp (rill 0.1.0)`: the version is rill's.
            .version(format!("(rill {})", env!("CARGO_PKG_VERSION")))
            .subcommand_required(true)
            .arg_required_else_help(true)
            // A `help` of rill's own (below) also answers `help --help`.
            .disable_help_subcommand(true)
            .arg(
                Arg::new("broker")
                    .long("broker")
                    .short('b')
                    .global(true)
                    .env("RILL_BROKER")
                    .value_name("URL")
                    .help("Broker URL: memory:// (embedded), file://PATH[?fsync=commit|always|never] (embedded, durable) or kafka://host:port[,host:port]"),
            )
            .arg(
                Arg::new("loglevel")
                    .long("loglevel")
                    .short('l')
                    .global(true)
                    .env("RILL_LOG")
                    .value_name("LEVEL")
                    .ignore_case(true)
                    .value_parser(clap::builder::PossibleValuesParser::new(LEVELS))
                    .help(
                        "Log level, in any case: critical, error, warning, info, debug or trace \
                         [default: warning]",
                    ),
            )
            .arg(
                Arg::new("logfile")
                    .long("logfile")
                    .short('f')
                    .global(true)
                    .env("RILL_LOGFILE")
                    .value_name("PATH")
                    .value_parser(clap::value_parser!(std::path::PathBuf))
                    .help("Append the log to this file instead of writing it to stderr"),
            )
            .arg(
                Arg::new("store")
                    .long("store")
                    .global(true)
                    .env("RILL_STORE")
                    .value_name("URL")
                    .help("Local table store: memory:// (rebuild from changelogs) or fjall://PATH"),
            )
            .arg(
                Arg::new("datadir")
                    .long("datadir")
                    .global(true)
                    .env("RILL_DATADIR")
                    .value_name("PATH")
                    .value_parser(clap::value_parser!(std::path::PathBuf))
                    .help(
                        "The app's data directory, where its running worker announces itself \
                         [default: <app id>-data]",
                    ),
            )
            .subcommand(
                clap::Command::new("worker")
                    .about("Run the app's agents until Ctrl-C or SIGTERM, then drain and commit")
                    .arg(
                        Arg::new("web_port")
                            .long("web-port")
                            .short('p')
                            .env("RILL_WEB_PORT")
                            .value_name("PORT")
                            .value_parser(clap::value_parser!(u16))
                            .default_value("6066")
                            .help("Port of the web server (table lookups); 0 picks a free one"),
                    )
                    .arg(
                        Arg::new("web_bind")
                            .long("web-bind")
                            .env("RILL_WEB_BIND")
                            .value_name("ADDRESS")
                            .default_value("127.0.0.1")
                            .help("Address the web server listens on"),
                    )
                    .arg(
                        Arg::new("web_host")
                            .long("web-host")
                            .env("RILL_WEB_HOST")
                            .value_name("HOST")
                            .help(
                                "Host name other workers reach this one's web server by \
                                 [default: the bound address, or this host's name when bound \
                                 to 0.0.0.0]",
                            ),
                    )
                    .arg(
                        Arg::new("bad_input")
                            .long("bad-input")
                            .env("RILL_BAD_INPUT")
                            .value_name("ACTION")
                            .value_parser(["skip", "dead-letter"])
                            .help("What to do with messages an agent cannot read [default: skip]"),
                    )
                    .arg(
                        Arg::new("processing_guarantee")
                            .long("processing-guarantee")
                            .env("RILL_PROCESSING_GUARANTEE")
                            .value_name("GUARANTEE")
                            .ignore_case(true)
                            .value_parser([
                                clap::builder::PossibleValue::new("at_least_once")
                                    .alias("at-least-once"),
                                clap::builder::PossibleValue::new("exactly_once")
                                    .aliases(["exactly-once", "exactly_once_v2"]),
                            ])
                            .help("at_least_once (the default) or exactly_once (Kafka transactions)"),
                    )
                    .arg(
                        Arg::new("worker_id")
                            .long("worker-id")
                            .env("RILL_WORKER_ID")
                            .value_name("NAME")
                            .help("Names this worker across restarts (its transactional id with exactly_once)"),
                    )
                    .arg(
                        Arg::new("without_web")
                            .long("without-web")
                            .action(clap::ArgAction::SetTrue)
                            .help("Do not serve the web interface"),
                    ),
            )
            .subcommand(
                clap::Command::new("reset")
                    .about("Remove the local state of the app's tables (the changelogs are kept)")
                    .arg(
                        Arg::new("yes")
                            .long("yes")
                            .action(clap::ArgAction::SetTrue)
                            .help("Confirm the removal"),
                    ),
            )
            .subcommand(
                clap::Command::new("help")
                    .about("Print this message or the help of the given command")
                    .arg(
                        Arg::new("command")
                            .value_name("COMMAND")
                            .help("The command to explain"),
                    ),
            );
        for c in self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            cmd = cmd.subcommand(c.clap());
        }
        ops::add_commands(cmd)
    }

    /// Runs the command line and exits the process: `worker` runs the agents; the app's
    /// commands run with them. Exit codes: 0 on success, 1 on failure, 2 on a usage error.
    pub fn main(&self) -> ! {
        let code = match self.main_from(std::env::args_os()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        };
        std::process::exit(code)
    }

    /// Runs the command line with `args` (the first is the program name). Usage errors print
    /// the usage and exit the process with code 2, as clap does.
    pub fn main_from<I, S>(&self, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString> + Clone,
    {
        let matches = self.parse_command_line(args)?;
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::Config(
                "App::main starts its own async runtime: call it from a plain `fn main`, or \
                 call `App::main_async().await` from `#[tokio::main]`"
                    .into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot start the async runtime: {e}")))?;
        runtime.block_on(self.run_command_line(&matches))
    }

    /// Runs the command line, as [`main`](App::main) does, on the async runtime it is awaited
    /// on (from `#[tokio::main]`, say), and returns how it ended instead of exiting. Usage
    /// errors print the usage and exit the process with code 2, as clap does.
    ///
    /// ```no_run
    /// use rill::prelude::*;
    ///
    /// #[tokio::main]
    /// async fn main() -> rill::Result<()> {
    ///     let app = App::new("hello");
    ///     app.command("hello", |_: NoArgs| async {
    ///         println!("hello");
    ///         Ok::<_, rill::Error>(())
    ///     });
    ///     app.main_async().await
    /// }
    /// ```
    pub async fn main_async(&self) -> Result<()> {
        self.main_async_from(std::env::args_os()).await
    }

    /// As [`main_async`](App::main_async), with `args` (the first is the program name).
    pub async fn main_async_from<I, S>(&self, args: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString> + Clone,
    {
        let matches = self.parse_command_line(args)?;
        self.run_command_line(&matches).await
    }

    /// Parses the command line and applies its global options (logging, broker, store).
    fn parse_command_line<I, S>(&self, args: I) -> Result<clap::ArgMatches>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        if let Some(program) = args.first() {
            let name = std::path::Path::new(program)
                .file_name()
                .unwrap_or(program)
                .to_string_lossy()
                .into_owned();
            *self.program.lock().unwrap_or_else(|e| e.into_inner()) = Some(name);
        }
        self.check_command_names()?;
        let matches = self.cli().get_matches_from(args);
        let level = matches
            .get_one::<String>("loglevel")
            .map(|l| l.to_ascii_lowercase())
            .unwrap_or_else(|| "warn".to_owned());
        init_logging(
            &level,
            matches
                .get_one::<std::path::PathBuf>("logfile")
                .map(|p| p.as_path()),
        )?;
        if let Some(broker) = matches.get_one::<String>("broker") {
            let broker = broker.clone();
            self.configure(|s| s.broker = broker);
        }
        if let Some(store) = matches.get_one::<String>("store") {
            let store = store.clone();
            self.configure(|s| s.store = store);
        }
        if let Some(datadir) = matches.get_one::<std::path::PathBuf>("datadir") {
            let datadir = datadir.clone();
            self.configure(|s| s.datadir = Some(datadir));
        }
        Ok(matches)
    }

    /// Runs the command `matches` name.
    async fn run_command_line(&self, matches: &clap::ArgMatches) -> Result<()> {
        let level = matches
            .get_one::<String>("loglevel")
            .map(|l| l.to_ascii_lowercase())
            .unwrap_or_else(|| "warn".to_owned());
        let level = level.as_str();
        let (name, sub) = matches
            .subcommand()
            .ok_or_else(|| Error::Config("no command given".into()))?;
        if name == "worker" {
            // A worker on the default broker keeps its log on disk, in its data directory, as a
            // Faust worker keeps its data there: a restarted worker goes on where it stopped.
            // `--broker memory://` (or RILL_BROKER) keeps it in memory.
            if matches.get_one::<String>("broker").is_none()
                && self.settings().broker == DEFAULT_BROKER
            {
                let durable = format!("file://{}", self.datadir().display());
                self.configure(|s| s.broker = durable);
            }
            let port = if sub.get_flag("without_web") {
                None
            } else {
                sub.get_one::<u16>("web_port").copied()
            };
            let bind = sub
                .get_one::<String>("web_bind")
                .cloned()
                .unwrap_or_else(|| "127.0.0.1".to_owned());
            let bad_input = sub
                .get_one::<String>("bad_input")
                .and_then(|b| b.parse().ok());
            let guarantee = sub
                .get_one::<String>("processing_guarantee")
                .and_then(|g| g.parse().ok());
            let worker_id = sub.get_one::<String>("worker_id").cloned();
            let web_host = sub.get_one::<String>("web_host").cloned();
            self.configure(|s| {
                s.web_port = port;
                s.web_bind = bind;
                s.web_host = web_host.or(s.web_host.take());
                s.processing_guarantee = guarantee.unwrap_or(s.processing_guarantee);
                s.worker_id = worker_id.or(s.worker_id.take());
                s.bad_input = bad_input.unwrap_or(s.bad_input);
            });
            return self.run_worker(level).await;
        }
        if name == "reset" {
            return self.reset(sub.get_flag("yes"));
        }
        if name == "help" {
            let mut cli = self.cli();
            let topic = sub.get_one::<String>("command").map(|c| {
                (
                    c.clone(),
                    cli.find_subcommand_mut(c).map(|c| c.render_long_help()),
                )
            });
            match topic {
                None => print!("{}", cli.render_long_help()),
                Some((_, Some(help))) => print!("{help}"),
                Some((command, None)) => {
                    return Err(Error::Config(format!(
                        "no command named {command:?}; `help` lists them"
                    )))
                }
            }
            return Ok(());
        }
        let own = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|c| c.name() == name);
        if own || name == "send" {
            self.reach_running_worker().await;
        }
        if let Some(result) = self.run_tool(name, sub).await {
            return result;
        }
        let command = self
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|c| c.name() == name)
            .cloned()
            .ok_or_else(|| Error::Config(format!("unknown command {name:?}")))?;
        let worker = self
            .start_with(Role::for_command(self.is_embedded()))
            .await?;
        let result = match command.run(sub) {
            Ok(fut) => fut.await.map_err(|source| Error::Command {
                command: name.to_owned(),
                source,
            }),
            Err(e) => Err(e),
        };
        let stopped = worker.shutdown().await;
        result.and(stopped)
    }

    async fn run_worker(&self, level: &str) -> Result<()> {
        // Listen before anything else: a signal sent once the banner shows must stop the
        // worker cleanly, not kill it.
        let mut signals =
            Signals::new().map_err(|e| Error::Config(format!("cannot listen for signals: {e}")))?;
        let worker = self.start().await?;
        let s = self.settings();
        println!("┌ rill {} worker", env!("CARGO_PKG_VERSION"));
        println!("│ app id     {}", self.id());
        println!("│ transport  {}", s.broker);
        println!("│ agents     {}", self.agent_names().join(", "));
        let tables = self.table_names();
        if !tables.is_empty() {
            println!("│ tables     {}", tables.join(", "));
        }
        println!("│ store      {}", s.store);
        if let Some(addr) = worker.web_addr() {
            match worker.web_url() {
                Some(url) if url != format!("http://{addr}") => {
                    println!("│ web        http://{addr} (advertised as {url})")
                }
                _ => println!("│ web        http://{addr}"),
            }
        }
        if self.owns_embedded_broker() {
            let datadir = self.datadir();
            if worker.is_reachable() {
                println!(
                    "│ datadir    {} (this app's commands in other processes come here)",
                    datadir.display()
                );
            } else {
                println!(
                    "│ datadir    {} (not reachable without the web: this app's commands in \
                     other processes run agents of their own)",
                    datadir.display()
                );
            }
        }
        println!("│ loglevel   {level}");
        println!("│ guarantee  {}", s.processing_guarantee);
        // Ready means serving: partitions assigned, tables restored (`GET /ready`).
        let ready = tokio::select! {
            ready = worker.ready() => ready,
            _ = signals.recv() => return worker.shutdown().await,
        };
        if ready {
            println!("└ ready (Ctrl-C or SIGTERM stops the worker)");
        }
        tokio::select! {
            _ = signals.recv() => worker.shutdown().await,
            // A worker that cannot go on exits with an error, so that whatever runs it knows.
            _ = worker.stopped() => {
                let reason = worker.fatal_error();
                worker.shutdown().await?;
                Err(Error::Transport(crate::error::TransportError::Other(match reason {
                    Some(reason) => format!("the worker stopped: {reason}"),
                    None => "the worker stopped after an error it cannot go on from (logged above)"
                        .into(),
                })))
            }
        }
    }
}

impl App {
    /// Before a command that sends (`send`, the app's own commands) on the app's own embedded
    /// broker: looks for the app's running worker in its data directory. Found, the command
    /// runs as its client, on `remote://`; not found, it runs the agents in this process, as
    /// it says once on stderr.
    async fn reach_running_worker(&self) {
        if !self.owns_embedded_broker() {
            return;
        }
        let datadir = self.datadir();
        match discovery::find(&datadir, self.id()).await {
            discovery::Found::Running(running) => {
                tracing::info!(
                    app = %running.app,
                    pid = running.pid,
                    web = %running.web,
                    datadir = %datadir.display(),
                    "a worker of this app is running: this command runs as its client"
                );
                let url = format!("remote://{}", running.address());
                self.configure(|s| s.broker = url);
            }
            found => {
                match found {
                    discovery::Found::Stale(why) => {
                        tracing::info!(reason = %why, "ignoring a stale worker.json")
                    }
                    discovery::Found::OtherApp(other) => tracing::info!(
                        app = %other.app,
                        pid = other.pid,
                        "the data directory's worker.json is another app's"
                    ),
                    _ => {}
                }
                eprintln!(
                    "no worker of app {:?} is running (datadir {}): running its agents in this \
                     process",
                    self.id(),
                    datadir.display()
                );
            }
        }
    }

    /// Refuses an app command named like a built-in one: it would hide the built-in (an app's
    /// `send` taking `send @agent '{...}'` as its own arguments), or never run.
    fn check_command_names(&self) -> Result<()> {
        let commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        match commands.iter().find(|c| BUILT_IN.contains(&c.name())) {
            Some(c) => Err(Error::Config(format!(
                "app {:?} declares a command named {:?}, which is the name of a built-in command \
                 ({}): give it another name",
                self.id(),
                c.name(),
                BUILT_IN.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

/// Logs at `level` (Faust's and Python's names too) to stderr, or appended to `file`.
fn init_logging(level: &str, file: Option<&std::path::Path>) -> Result<()> {
    let level = match level {
        "critical" | "crit" | "fatal" => "error",
        "warning" => "warn",
        other => other,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    Error::Config(format!("cannot open the log file {}: {e}", path.display()))
                })?;
            logs.with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init()
        }
        None => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init(),
    };
    Ok(())
}
