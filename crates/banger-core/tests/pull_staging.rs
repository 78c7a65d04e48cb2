//! A pull whose layers outgrow the memory they may be unpacked in carries on
//! on disk and builds the same image.

use std::sync::Arc;

use banger_core::events::Events;
use banger_core::ops::Core;
use banger_core::paths::Paths;
use banger_core::services::images::PullHooks;
use banger_proto::image::PullParams;
use banger_testkit::layer::{self, file, Compression};
use banger_testkit::layout::Layout;
use banger_testkit::registry::Registry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_outgrowing_their_memory_share_are_unpacked_on_disk() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        eprintln!("skipping: no /dev/shm");
        return;
    }
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("oci"));
    let image = layout.image(
        &[
            (
                Compression::Gzip,
                layer::tar(&[file("small", "first layer\n", 0o644)]),
            ),
            (
                Compression::Gzip,
                layer::tar(&[file("big", &"x".repeat(12 << 20), 0o600)]),
            ),
            (
                Compression::Zstd,
                layer::tar(&[file("last", "third layer\n", 0o644)]),
            ),
        ],
        "amd64",
    );
    layout.tag("t", &image);
    registry.push(&layout.dir, "t", "grows:t", &[]);

    // The daemon's log says where the layers went.
    let log = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || Sink(sink.clone()))
        .init();
    let hooks = PullHooks {
        memory_share: Some(1 << 20),
        ..Default::default()
    };
    let paths = Paths::under(&tmp.path().join("home"));
    let core = Core::open(paths.clone(), Arc::new(banger_host::RealRunner), hooks).unwrap();
    let params = PullParams {
        reference: registry.reference("grows:t"),
        name: Some("grows".into()),
        platform: None,
    };
    let pulled = core.images.pull(params, Events::none()).await.unwrap();
    assert_eq!(pulled.image.content_bytes, (12 << 20) + 12 + 12);
    let listing = std::process::Command::new("debugfs")
        .args(["-R", "ls -l /", &pulled.image.rootfs_path])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for name in ["small", "big", "last"] {
        assert!(listing.contains(name), "{name} missing: {listing}");
    }
    // Neither staging directory outlives the pull.
    assert_eq!(std::fs::read_dir(paths.tmp_dir()).unwrap().count(), 0);
    let prefix = banger_core::rootfs::staging::dir_prefix(&paths.state_dir.display().to_string());
    let leftovers: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let log = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(
        log.contains("in_memory=true") && log.contains("unpacking on disk"),
        "{log}"
    );
}

struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
