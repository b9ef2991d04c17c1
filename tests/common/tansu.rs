//! A tansu broker (a Kafka-compatible broker, run as a separate process) for the tests that
//! need a real broker process: started on a free loopback port, stopped on drop.
//!
//! The broker is `tansu` 0.6.0 from PATH, `~/.cargo/bin`, or `RILL_TANSU`; `scripts/test`
//! installs it when missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn find_tansu() -> PathBuf {
    if let Ok(p) = std::env::var("RILL_TANSU") {
        return PathBuf::from(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
        .expect(
            "tansu not found: install it with \
             `cargo install tansu --version 0.6.0 --locked --features dynostore,libsql` \
             (scripts/test does) or set RILL_TANSU",
        )
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

pub(crate) fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rill-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A tansu broker process on a free loopback port.
pub(crate) struct Tansu {
    port: u16,
    dir: PathBuf,
    storage: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Tansu {
    pub(crate) fn start(dir: &Path, storage: String) -> Self {
        let mut t = Tansu {
            port: free_port(),
            dir: dir.to_owned(),
            storage,
            log: dir.join("tansu.log"),
            child: None,
        };
        t.spawn();
        t
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn spawn(&mut self) {
        let url = format!("tcp://{}", self.addr());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("tansu log");
        let child = Command::new(find_tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &self.storage,
            ])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}
