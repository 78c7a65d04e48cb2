//! Inputs that would exhaust memory or disk: a registry sending an endless
//! manifest, `kernel import` of a device or FIFO, a layer that expands past
//! its limit, and a pull that outgrows the disk. Each stops early with a
//! clear error, leaves nothing behind, and costs the daemon little memory.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use banger_testkit::layer::{self, Compression, Entry};
use banger_testkit::layout::Layout;
use banger_testkit::registry::Registry;
use common::{entries, must, Banger};

/// A "registry" that answers every manifest request with an endless body:
/// with a 4 GiB Content-Length when `declared`, chunked otherwise.
fn endless_registry(declared: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let n = stream.read(&mut request).unwrap_or(0);
                let head = String::from_utf8_lossy(&request[..n]).into_owned();
                if !head.contains("/manifests/") {
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}",
                    );
                    return;
                }
                let header = if declared {
                    "Content-Length: 4294967296\r\n"
                } else {
                    "Transfer-Encoding: chunked\r\n"
                };
                let _ = stream.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n{header}\r\n"
                    )
                    .as_bytes(),
                );
                let block = vec![b' '; 64 * 1024];
                loop {
                    let sent = if declared {
                        stream.write_all(&block)
                    } else {
                        stream
                            .write_all(format!("{:x}\r\n", block.len()).as_bytes())
                            .and_then(|()| stream.write_all(&block))
                            .and_then(|()| stream.write_all(b"\r\n"))
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn an_endless_manifest_is_refused_early() {
    let banger = Banger::start();
    let base = common::daemon_peak_kib(&banger);
    for declared in [true, false] {
        let addr = endless_registry(declared);
        let started = std::time::Instant::now();
        let err = banger.fails(&["image", "pull", &format!("{addr}/huge:latest")]);
        assert!(err.contains("larger than 4 MiB"), "{err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
    let grown = common::daemon_peak_kib(&banger).saturating_sub(base);
    assert!(grown < 64 * 1024, "the daemon grew by {grown} KiB");
    assert!(entries(&banger.path("state/tmp")).is_empty());
}

#[test]
fn kernel_import_takes_only_regular_files() {
    let banger = Banger::start();
    let fifo = banger.path("kernel.fifo");
    must(&format!("mkfifo {}", fifo.display()));
    for path in ["/dev/zero", fifo.to_str().unwrap(), "/tmp"] {
        let started = std::time::Instant::now();
        let err = banger.fails(&["kernel", "import", path]);
        assert!(err.contains("not a regular file"), "{path}: {err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
    assert_eq!(banger.ok(&["kernel", "ls", "--json"]).trim(), "[]");
}

/// A one-layer image whose single file of zeros is `size` bytes.
fn push_zeros(registry: &Registry, dir: &std::path::Path, repo_tag: &str, size: usize) {
    let mut layout = Layout::new(dir);
    let zeros = Entry::File {
        path: "zeros".into(),
        data: vec![0u8; size],
        mode: 0o644,
        uid: 0,
        gid: 0,
        xattrs: vec![],
    };
    let image = layout.image(&[(Compression::Gzip, layer::tar(&[zeros]))], "amd64");
    layout.tag("t", &image);
    registry.push(&layout.dir, "t", repo_tag, &[]);
}

#[test]
fn a_layer_expanding_past_its_limit_stops_the_pull() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    push_zeros(&registry, &tmp.path().join("oci"), "bomb:latest", 8 << 20);
    let mut banger = Banger::without_daemon();
    std::fs::create_dir_all(banger.path("config")).unwrap();
    std::fs::write(
        banger.path("config/config.toml"),
        "[limits]\nmax_layer_bytes = 4194304\n",
    )
    .unwrap();
    banger.start_daemon();
    let err = banger.fails(&["image", "pull", &registry.reference("bomb:latest")]);
    assert!(
        err.contains("expands past 4 MiB") && err.contains("limits.max_layer_bytes"),
        "{err}"
    );
    assert!(entries(&banger.path("state/tmp")).is_empty());
    assert_eq!(banger.ok(&["image", "ls", "--json"]).trim(), "[]");
}

#[test]
fn a_pull_that_outgrows_the_disk_stops_with_the_free_space_named() {
    if !common::root_or_skip("mounting a small filesystem") {
        return;
    }
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    // 96 MiB of zeros: a small download that cannot unpack on 64 MiB.
    push_zeros(&registry, &tmp.path().join("oci"), "big:latest", 96 << 20);
    let mut banger = Banger::without_daemon();
    let home = banger.home.path().to_path_buf();
    let _mounted = common::Mounted::tmpfs(&home, "64m");
    std::fs::create_dir_all(banger.path("config")).unwrap();
    std::fs::write(
        banger.path("config/config.toml"),
        "[limits]\nmin_free_bytes = 8388608\n",
    )
    .unwrap();
    banger.start_daemon();
    let err = banger.fails(&["image", "pull", &registry.reference("big:latest")]);
    assert!(err.contains("MiB left on the filesystem"), "{err}");
    assert!(entries(&banger.path("state/tmp")).is_empty());
    // The disk is usable again: nothing of the pull stayed.
    let df = must(&format!(
        "df --output=used -B1M {} | tail -1",
        home.display()
    ));
    assert!(df.trim().parse::<u64>().unwrap() < 16, "{df}");
}

#[test]
fn a_huge_console_log_is_tailed_from_its_end_and_streamed() {
    let registry = Registry::start();
    let banger = Banger::start();
    common::busybox_and_fake_kernel(&banger, &registry);
    banger.ok(&["vm", "create", "v", "--image", "busybox", "--kernel", "k"]);
    // A guest that printed 200 MiB.
    let log = banger.path("state/vms/v/console.log");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&log).unwrap());
        let line = format!("{}\n", "y".repeat(1023));
        for _ in 0..(200 << 10) {
            f.write_all(line.as_bytes()).unwrap();
        }
        f.write_all(b"second to last\nthe end\n").unwrap();
    }
    let base = common::daemon_peak_kib(&banger);
    let started = std::time::Instant::now();
    let tail = banger.ok(&["vm", "logs", "v", "--tail", "2"]);
    assert_eq!(tail, "second to last\nthe end\n");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    let out = banger.cmd(&["vm", "logs", "v"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        out.stdout.len() as u64,
        std::fs::metadata(&log).unwrap().len()
    );
    let grown = common::daemon_peak_kib(&banger).saturating_sub(base);
    assert!(grown < 64 * 1024, "the daemon grew by {grown} KiB");
}

#[test]
fn sizes_a_vm_cannot_have_are_refused_at_create_with_the_range() {
    let registry = Registry::start();
    let banger = Banger::start();
    common::busybox_and_fake_kernel(&banger, &registry);
    for (flag, value, range) in [
        ("--vcpus", "0", "vCPUs"),
        ("--vcpus", "1000", "vCPUs"),
        ("--memory", "1T", "MiB (this host's memory)"),
        ("--memory", "16M", "64 MiB to"),
        ("--disk", "100T", "at most 16 TiB"),
    ] {
        let err = banger.fails(&[
            "vm", "create", "v", "--image", "busybox", "--kernel", "k", flag, value,
        ]);
        assert!(
            err.contains("out of range") && err.contains(range),
            "{flag} {value}: {err}"
        );
    }
    assert_eq!(banger.ok(&["vm", "ls", "--json"]).trim(), "[]");
    assert!(entries(&banger.path("state/vms")).is_empty());
}

#[test]
fn ctrl_c_on_a_long_request_says_the_daemon_carries_on() {
    // A registry that accepts and never answers: the pull waits.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(8).collect();
        std::thread::sleep(std::time::Duration::from_secs(60));
        drop(held);
    });
    let banger = Banger::start();
    let child = banger
        .cmd(&["image", "pull", &format!("{addr}/slow:latest")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted; the daemon finishes pulling") && err.contains("banger image"),
        "{err}"
    );
}
