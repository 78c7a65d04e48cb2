//! A prune that lands while a pull is downloading leaves both working.

use std::sync::Arc;

use banger_core::events::Events;
use banger_core::ops::Core;
use banger_core::paths::Paths;
use banger_core::services::images::PullHooks;
use banger_proto::image::PullParams;
use banger_testkit::layer::{self, file, Compression};
use banger_testkit::layout::Layout;
use banger_testkit::registry::Registry;
use futures_util::FutureExt;
use tokio::sync::{mpsc, Semaphore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_while_a_pull_downloads() {
    let registry = Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("oci"));
    let image = layout.image(
        &[
            (
                Compression::Gzip,
                layer::tar(&[file("one", &"1".repeat(100_000), 0o644)]),
            ),
            (
                Compression::Zstd,
                layer::tar(&[file("two", &"2".repeat(100_000), 0o644)]),
            ),
        ],
        "amd64",
    );
    layout.tag("t", &image);
    registry.push(&layout.dir, "t", "inflight:t", &[]);

    // The first layer download pauses after its first chunk until released.
    let (reached_tx, mut reached) = mpsc::unbounded_channel::<String>();
    let release = Arc::new(Semaphore::new(0));
    let hook_release = release.clone();
    let first = image.layers[0].clone();
    let hooks = PullHooks {
        mid_download: Some(Arc::new(move |digest: String| {
            let reached_tx = reached_tx.clone();
            let release = hook_release.clone();
            let pause = digest == first;
            async move {
                if pause {
                    let _ = reached_tx.send(digest);
                    release.acquire().await.unwrap().forget();
                }
            }
            .boxed()
        })),
        ..Default::default()
    };
    let paths = Paths::under(&tmp.path().join("home"));
    let core =
        Arc::new(Core::open(paths.clone(), Arc::new(banger_host::RealRunner), hooks).unwrap());

    let pull_core = core.clone();
    let reference = registry.reference("inflight:t");
    let pull = tokio::spawn(async move {
        let params = PullParams {
            reference,
            name: Some("inflight".into()),
            platform: None,
        };
        pull_core.images.pull(params, Events::none()).await
    });
    assert_eq!(reached.recv().await.unwrap(), image.layers[0]);

    // Mid-download: the cache holds at least the config blob; prune takes it all.
    let pruned = core.images.prune_cache(false).await.unwrap();
    assert!(pruned.blobs_freed >= 1, "{pruned:?}");
    let cache = paths.oci_cache();
    let siblings: Vec<_> = std::fs::read_dir(cache.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(siblings, ["oci"], "the aside dir never outlives the call");

    release.add_permits(1);
    let result = pull
        .await
        .unwrap()
        .expect("the in-flight pull still succeeds");
    assert!(std::path::Path::new(&result.image.rootfs_path).is_file());
    // The interrupted download landed in the fresh cache.
    let hex = image.layers[0].trim_start_matches("sha256:");
    assert!(cache.join("blobs/sha256").join(hex).is_file());
    // And the next prune works as usual.
    assert!(core.images.prune_cache(false).await.unwrap().blobs_freed >= 1);
}

#[test]
fn reopening_clears_what_a_killed_daemon_left() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = Paths::under(tmp.path());
    paths.create_all().unwrap();
    let staging = paths.tmp_dir().join("pull-dead/rootfs/etc");
    std::fs::create_dir_all(&staging).unwrap();
    let orphan = paths.images_dir().join("0123abcd");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("rootfs.ext4"), b"half").unwrap();
    let aside = paths.cache_dir.join(".pruning-oci-dead");
    std::fs::create_dir_all(aside.join("blobs")).unwrap();

    let _core = Core::open(
        paths.clone(),
        Arc::new(banger_host::RealRunner),
        PullHooks::default(),
    )
    .unwrap();
    assert_eq!(std::fs::read_dir(paths.tmp_dir()).unwrap().count(), 0);
    assert!(!orphan.exists(), "an image dir without a record is removed");
    assert!(!aside.exists(), "a prune's aside dir is removed");
}
