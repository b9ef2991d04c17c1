//! How the app's processes find its running embedded worker: the worker announces itself in
//! `<datadir>/worker.json`, and the app's commands read it (see
//! [`Settings::datadir`](crate::Settings::datadir)).
//!
//! A `worker.json` counts only while its worker runs: its process exists, and its web server
//! answers `GET /transport` with the same app id and instance id. Anything else (the process
//! exited, nothing answers, another worker answers) is a stale file, ignored and replaced.

use crate::error::{Error, Result};
use crate::transport::remote;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file a running worker writes in the app's data directory.
pub(crate) const FILE: &str = "worker.json";

/// How long a check of a worker's address may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a running worker writes in `worker.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Announced {
    /// The app id.
    pub(crate) app: String,
    /// The worker's process id.
    pub(crate) pid: u32,
    /// Where its web server answers: `http://host:port`.
    pub(crate) web: String,
    /// Its instance id, random per run.
    pub(crate) instance: String,
    /// Its broker URL (`memory://`).
    pub(crate) transport: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub(crate) started: i64,
}

impl Announced {
    /// `host:port` of its web server: what follows `remote://`.
    pub(crate) fn address(&self) -> &str {
        self.web.trim_start_matches("http://").trim_end_matches('/')
    }
}

/// What the data directory says of the app's worker.
#[derive(Debug)]
pub(crate) enum Found {
    /// A worker of the app runs and answers.
    Running(Announced),
    /// No `worker.json`.
    Nothing,
    /// A running worker of another app announced itself there (the apps share a data
    /// directory).
    OtherApp(Announced),
    /// A `worker.json` of no running worker, and why.
    Stale(String),
}

/// Looks for the running worker of `app` announced in `datadir`. Creates nothing.
pub(crate) async fn find(datadir: &Path, app: &str) -> Found {
    let path = datadir.join(FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Found::Nothing,
        Err(e) => return Found::Stale(format!("cannot read {}: {e}", path.display())),
    };
    let announced: Announced = match serde_json::from_slice(&text) {
        Ok(a) => a,
        Err(e) => {
            return Found::Stale(format!(
                "{} is not a worker's announcement: {e}",
                path.display()
            ))
        }
    };
    if process_exited(announced.pid) {
        return Found::Stale(format!(
            "{} names process {}, which is not running",
            path.display(),
            announced.pid
        ));
    }
    match remote::hello(&announced.web, CHECK_TIMEOUT).await {
        Ok(hello) if hello.app == announced.app && hello.instance == announced.instance => {
            if announced.app == app {
                Found::Running(announced)
            } else {
                Found::OtherApp(announced)
            }
        }
        Ok(hello) => Found::Stale(format!(
            "{} names worker {} of app {:?} at {}, but worker {} of app {:?} answers there",
            path.display(),
            announced.instance,
            announced.app,
            announced.web,
            hello.instance,
            hello.app
        )),
        Err(e) => Found::Stale(format!(
            "{} names a worker at {} that does not answer: {e}",
            path.display(),
            announced.web
        )),
    }
}

/// Whether process `pid` is known to have exited (on Linux, by `/proc`; elsewhere unknown,
/// and the check of its address decides).
fn process_exited(pid: u32) -> bool {
    Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// The error of a second worker of an app on the same data directory.
pub(crate) fn already_running(datadir: &Path, running: &Announced) -> Error {
    Error::Config(format!(
        "a worker of app {:?} is already running on this data directory ({}): process {}, web \
         {}. An embedded app (memory://) runs one worker; stop that one first, or give this \
         one another --datadir (to run several workers of an app, use Kafka)",
        running.app,
        datadir.display(),
        running.pid,
        running.web
    ))
}

/// The error of a worker whose data directory another app's running worker announced
/// itself in.
pub(crate) fn taken(datadir: &Path, app: &str, running: &Announced) -> Error {
    Error::Config(format!(
        "the data directory {} of app {app:?} holds the worker.json of a running worker of app \
         {:?} (process {}, web {}): give each app its own --datadir",
        datadir.display(),
        running.app,
        running.pid,
        running.web
    ))
}

/// A running worker's `worker.json`, removed when this is released or dropped.
#[derive(Debug)]
pub(crate) struct Announcement {
    path: PathBuf,
    instance: String,
    /// The data directory, when the worker made it (removed again if left empty).
    made: Option<PathBuf>,
}

/// Announces a worker in `datadir` (made if missing): writes `worker.json` in one step (a
/// complete file appears or none), unless a running worker of the app announced itself there
/// first, which is an error naming it. A stale file is replaced.
pub(crate) async fn announce(datadir: &Path, announced: &Announced) -> Result<Announcement> {
    let made = if datadir.is_dir() {
        None
    } else {
        std::fs::create_dir_all(datadir).map_err(|e| {
            Error::Config(format!(
                "cannot make the data directory {}: {e} (set another with --datadir)",
                datadir.display()
            ))
        })?;
        Some(datadir.to_path_buf())
    };
    let path = datadir.join(FILE);
    // Not this worker's file until it is claimed; on an error, dropping this removes only the
    // directory made here, if nothing else is in it.
    let mut announcement = Announcement {
        path: path.clone(),
        instance: String::new(),
        made,
    };
    let temporary = datadir.join(format!(".{FILE}.{}.{}", announced.pid, announced.instance));
    let text = serde_json::to_vec_pretty(announced)
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))?;
    let written = std::fs::write(&temporary, &text)
        .and_then(|()| std::fs::File::open(&temporary).and_then(|f| f.sync_all()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(Error::Config(format!(
            "cannot write {}: {e} (set another data directory with --datadir)",
            temporary.display()
        )));
    }
    let claimed = claim(datadir, &temporary, &path, &announced.app).await;
    let _ = std::fs::remove_file(&temporary);
    claimed?;
    announcement.instance = announced.instance.clone();
    Ok(announcement)
}

/// Links the complete `temporary` file as `path`, which must not exist (so that of two workers
/// starting at once, one wins); a stale `path` is removed first.
async fn claim(datadir: &Path, temporary: &Path, path: &Path, app: &str) -> Result<()> {
    for _ in 0..3 {
        match std::fs::hard_link(temporary, path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                match find(datadir, app).await {
                    Found::Running(running) => return Err(already_running(datadir, &running)),
                    Found::OtherApp(running) => return Err(taken(datadir, app, &running)),
                    Found::Stale(why) => {
                        tracing::info!(reason = %why, "replacing a stale worker.json");
                        let _ = std::fs::remove_file(path);
                    }
                    Found::Nothing => {}
                }
            }
            // A file system without hard links: replace in one step instead.
            Err(_) => {
                return std::fs::rename(temporary, path)
                    .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))
            }
        }
    }
    Err(Error::Config(format!(
        "cannot write {}: other processes keep replacing it",
        path.display()
    )))
}

impl Announcement {
    /// Removes `worker.json` if it is still this worker's, and the data directory if the
    /// worker made it and nothing else is in it. Once only.
    pub(crate) fn release(&mut self) {
        if !self.instance.is_empty() {
            let ours = std::fs::read(&self.path)
                .ok()
                .and_then(|text| serde_json::from_slice::<Announced>(&text).ok())
                .is_some_and(|a| a.instance == self.instance);
            if ours {
                let _ = std::fs::remove_file(&self.path);
            }
            self.instance.clear();
        }
        if let Some(dir) = self.made.take() {
            // Fails, as it should, when something else is in it.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Drop for Announcement {
    fn drop(&mut self) {
        self.release();
    }
}
