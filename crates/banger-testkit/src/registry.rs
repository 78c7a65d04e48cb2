//! A real OCI distribution registry (Debian's `docker-registry`) on a random
//! loopback port, killed when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Registry {
    child: Child,
    /// `user:password` when the registry requires a login.
    creds: Option<String>,
    pub addr: String,
    pub storage: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_inner(None)
    }

    /// A registry that answers only to `user` with `password` (HTTP basic).
    pub fn start_with_login(user: &str, password: &str) -> Registry {
        Self::start_inner(Some((user, password)))
    }

    fn start_inner(login: Option<(&str, &str)>) -> Registry {
        crate::require_tool("docker-registry");
        crate::require_tool("skopeo");
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((user, password)) = login {
            crate::require_tool("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .unwrap();
            assert!(out.status.success());
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, out.stdout).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yaml).unwrap();
        let log = dir.path().join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting docker-registry");
        let creds = login.map(|(u, p)| format!("{u}:{p}"));
        let registry = Registry {
            child,
            creds,
            addr,
            storage,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !registry.answers() {
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                registry.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(&self.addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).as_bytes())
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 32];
        // 401 is an answer too, from a registry that wants a login.
        matches!(s.read(&mut buf), Ok(n) if n > 12 && buf[..n].windows(3).any(|w| w == b"200" || w == b"401"))
    }

    /// Pushes `tag` of the OCI layout at `layout` to `repo_tag` (`repo:tag`).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str, opts: &[&str]) {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(opts)
            .args(
                self.creds
                    .iter()
                    .flat_map(|c| ["--dest-creds".to_string(), c.clone()]),
            )
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .output()
            .expect("running skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// Where the registry keeps a blob's bytes (to corrupt it in tests).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times a blob was fetched (GET) from the registry.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| {
                l.contains("GET /v2/")
                    && l.contains(&format!("/blobs/{digest}"))
                    && !l.contains("HEAD")
            })
            .filter(|l| l.contains("\" 200 ") || l.contains("\" 307 "))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
