//! A private engine in a temporary directory, for `demo` and `bench`: started from this same
//! binary, stopped and cleaned up on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TempEngine {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Child,
}

impl TempEngine {
    pub fn start() -> Result<TempEngine, String> {
        Self::with_config(None)
    }

    /// An engine running the TOML configuration `config` (written into its directory), or the
    /// built-in one (one tenant, one kernel NSM) without.
    pub fn with_config(config: Option<&str>) -> Result<TempEngine, String> {
        let dir = std::env::temp_dir().join(format!("netkernel-{}-{}", std::process::id(), nanos()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let socket = dir.join("engine.sock");
        let log = std::fs::File::create(dir.join("engine.log")).map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--socket"]).arg(&socket);
        if let Some(text) = config {
            let path = dir.join("engine.toml");
            std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            cmd.arg("--config").arg(path);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting engine: {e}"))?;
        let mut e = TempEngine { dir, socket, child };
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&e.socket).is_err() {
            // A configuration the engine rejects makes it exit at once; say so without waiting.
            if let Ok(Some(status)) = e.child.try_wait() {
                return Err(format!("engine exited ({status}):\n{}", e.log()));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!("engine did not start:\n{}", e.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(e)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("engine.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

impl Drop for TempEngine {
    fn drop(&mut self) {
        // Stops the engine and its NSMs (SIGTERM would leave NSMs serving guests running, for
        // a next engine); SIGTERM only if it does not answer.
        if netkernel_engine::request(&self.socket, &netkernel_control::EngineRequest::Shutdown).is_err() {
            // SAFETY: integers only, no memory passed; the child is reaped only after this, so its
            // pid cannot name another process.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
