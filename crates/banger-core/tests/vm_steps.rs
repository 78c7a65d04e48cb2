//! `vm create` and `vm start` undo every earlier step when any step fails,
//! driven through the recording fakes (no real VMM is launched).

use std::sync::Arc;

use banger_core::events::Events;
use banger_core::ops::{Core, Host};
use banger_core::paths::Paths;
use banger_core::vm::vmm::{BootSpec, CtlEndpoint, Vmm, VmmError, VmmProvider};
use banger_host::{
    BlockCall, FakeBlockDevices, FakeHostNetwork, FakeLauncher, FakeRunner, LauncherCall,
};
use banger_proto::image::{ImageConfig, ImageInfo};
use banger_proto::kernel::KernelInfo;
use banger_proto::vm::{CreateParams, RootMode};
use std::path::PathBuf;

/// A 64-byte ELF header with no program headers: "static" to the locator.
/// One file for the whole test binary.
fn fake_agent() -> &'static std::path::Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let path = std::env::temp_dir().join(format!("banger-test-agent-{}", std::process::id()));
        std::fs::write(&path, elf).unwrap();
        path
    })
}

/// One fake network per test thread: tests read it back through `net()`.
fn net() -> FakeHostNetwork {
    thread_local!(static NET: FakeHostNetwork = FakeHostNetwork::default());
    NET.with(|n| n.clone())
}

fn setup() -> (tempfile::TempDir, Arc<Core>, FakeLauncher) {
    let (tmp, core, launcher, _) = setup_with(FakeBlockDevices::default());
    (tmp, core, launcher)
}

fn setup_with(
    blockdevs: FakeBlockDevices,
) -> (tempfile::TempDir, Arc<Core>, FakeLauncher, FakeBlockDevices) {
    setup_full(blockdevs, None)
}

fn setup_full(
    blockdevs: FakeBlockDevices,
    vmms: Option<Arc<dyn VmmProvider>>,
) -> (tempfile::TempDir, Arc<Core>, FakeLauncher, FakeBlockDevices) {
    let tmp = tempfile::tempdir().unwrap();
    let paths = Paths::under(&tmp.path().join("home"));
    // Handed in whole: nothing in the core reads the environment.
    let mut config: banger_core::config::Config = toml::from_str(
        "boot_timeout_secs = 1\n[network]\nmode = \"tap\"\nsubnet = \"10.254.213.0/24\"\n",
    )
    .unwrap();
    config.agent_binary = Some(fake_agent().display().to_string());
    config.qemu.accel = Some("tcg".into());
    let launcher = FakeLauncher::default();
    let host = Host {
        runner: Arc::new(FakeRunner::default()),
        launcher: Arc::new(launcher.clone()),
        blockdevs: Arc::new(blockdevs.clone()),
        net: Arc::new(net()),
        privileged: true,
        vmms,
        jails: Default::default(),
    };
    let core = Core::open_configured(paths, config, host, Default::default()).unwrap();
    let rootfs = tmp.path().join("rootfs.ext4");
    std::fs::write(&rootfs, vec![0u8; 4096]).unwrap();
    core.store()
        .put_image(&ImageInfo {
            name: "img".into(),
            r#ref: "r/img:latest".into(),
            digest: "sha256:00".into(),
            rootfs_path: rootfs.display().to_string(),
            size_bytes: 4096,
            content_bytes: 1,
            config: ImageConfig::default(),
            created_at: "2026-01-01T00:00:00Z".into(),
            vms: vec![],
        })
        .unwrap();
    let vmlinux = tmp.path().join("vmlinux");
    std::fs::write(&vmlinux, b"\x7fELF").unwrap();
    core.store()
        .put_kernel(&KernelInfo {
            name: "k".into(),
            version: "6.1".into(),
            source: "vmlinux".into(),
            vmlinux_path: vmlinux.display().to_string(),
            modules_dir: None,
            config_path: None,
            default: true,
            size_bytes: 4,
            created_at: "2026-01-01T00:00:00Z".into(),
        })
        .unwrap();
    (tmp, Arc::new(core), launcher, blockdevs)
}

fn params(name: &str) -> CreateParams {
    CreateParams {
        name: name.into(),
        image: "img".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_failure_at_any_create_step_leaves_nothing() {
    let (_tmp, core, _launcher) = setup();
    let vms_dir = core.paths.state_dir.join("vms");
    for step in ["dir", "root-disk", "work-disk", "host-key", "record"] {
        core.vms.set_fail_point(Some(step));
        let err = core
            .vms
            .create(params("web"), Events::none())
            .await
            .unwrap_err();
        assert!(err.message.contains(step), "{step}: {}", err.message);
        assert!(
            core.store().get_vm("web").unwrap().is_none(),
            "{step}: record left"
        );
        assert!(!vms_dir.join("web").exists(), "{step}: directory left");
    }
    core.vms.set_fail_point(None);
    let info = core
        .vms
        .create(params("web"), Events::none())
        .await
        .unwrap();
    assert_eq!(info.state, "stopped");
    assert!(vms_dir.join("web/upper.ext4").is_file() && vms_dir.join("web/host_key").is_file());
    // Addresses: lowest free first, never shared, freed with the VM.
    assert_eq!(info.ip.as_deref(), Some("10.254.213.2"));
    let db = core.vms.create(params("db"), Events::none()).await.unwrap();
    assert_eq!(db.ip.as_deref(), Some("10.254.213.3"));
    core.vms.remove(&["web".into()], true).await.unwrap();
    let api = core
        .vms
        .create(params("api"), Events::none())
        .await
        .unwrap();
    assert_eq!(api.ip.as_deref(), Some("10.254.213.2"));
}

#[tokio::test]
async fn a_failure_at_any_start_step_leaves_no_process_socket_or_file() {
    let (_tmp, core, launcher) = setup();
    core.vms
        .create(params("web"), Events::none())
        .await
        .unwrap();
    let dir = core.paths.state_dir.join("vms/web");
    let before: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // The last case has no fail point: the fake VMM never reports ready, so
    // the boot times out, which must be undone the same way.
    let info = &core.vms.inspect(&["web".into()]).await.unwrap()[0];
    assert_eq!(info.ip.as_deref(), Some("10.254.213.2"));
    for step in [
        Some("initramfs"),
        Some("network"),
        Some("launch"),
        Some("runtime"),
        Some("configure"),
        Some("agent"),
        None,
    ] {
        core.vms.set_fail_point(step);
        let err = core.vms.start("web", Events::none()).await.unwrap_err();
        let label = step.unwrap_or("timeout");
        if let Some(step) = step {
            assert!(err.message.contains(step), "{label}: {}", err.message);
        } else {
            assert!(
                err.message.contains("failed to boot at stage"),
                "{}",
                err.message
            );
        }
        assert!(
            launcher.running().is_empty(),
            "{label}: a VMM is still running"
        );
        assert!(
            core.store().get_runtime("web").unwrap().is_none(),
            "{label}: runtime left"
        );
        let mut now: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        now.retain(|n| n != "console.log" && n != "vmm.log");
        let mut want = before.clone();
        want.retain(|n| n != "console.log" && n != "vmm.log");
        now.sort();
        want.sort();
        assert_eq!(now, want, "{label}: files left behind");
        assert!(net().routes().is_empty(), "{label}: route left");
        assert_eq!(
            core.vms.inspect(&["web".into()]).await.unwrap()[0].state,
            "stopped"
        );
    }
    // The tap was really handed out and routed, then came back to the pool.
    let guest: std::net::Ipv4Addr = "10.254.213.2".parse().unwrap();
    let instance = core.store().setting("network.instance").unwrap().unwrap();
    let tap = format!("bg{instance}t0");
    assert!(net()
        .calls()
        .contains(&banger_host::NetCall::Route(tap.clone(), guest)));
    assert!(net().taps_now().contains(&tap));
    // Every launched VMM was signalled.
    let launches = launcher
        .calls()
        .iter()
        .filter(|c| matches!(c, banger_host::LauncherCall::Launch(_)))
        .count();
    assert_eq!(
        launches, 4,
        "launched for runtime, configure, agent and the timeout"
    );
}

#[tokio::test]
async fn dm_snapshot_root_disks_are_set_up_per_boot_and_always_torn_down() {
    let (tmp, core, launcher, blockdevs) = setup_with(FakeBlockDevices::supported());
    let info = core
        .vms
        .create(
            CreateParams {
                root_mode: Some(RootMode::DmSnapshot),
                ..params("web")
            },
            Events::none(),
        )
        .await
        .unwrap();
    assert_eq!(info.root_mode, "dm-snapshot");
    let dir = core.paths.state_dir.join("vms/web");
    assert!(
        dir.join("cow.img").is_file() && !dir.join("root.ext4").exists(),
        "no copy of the image"
    );

    // A failed boot tears the snapshot down again (start first clears any leftover).
    core.vms.set_fail_point(Some("agent"));
    core.vms.start("web", Events::none()).await.unwrap_err();
    // Named for this uid and state directory as well as the VM.
    let device = format!(
        "banger-{}-{}-web",
        nix::unistd::geteuid(),
        banger_proto::jail::home_id(&core.paths.state_dir)
    );
    let teardown = BlockCall::Teardown {
        name: device.clone(),
    };
    let setup = BlockCall::Setup {
        name: device.clone(),
        origin: tmp.path().join("rootfs.ext4"),
        cow: dir.join("cow.img"),
    };
    assert_eq!(blockdevs.calls(), [teardown.clone(), setup, teardown]);
    assert!(blockdevs.live().is_empty());
    let launched = launcher.calls().into_iter().find_map(|c| match c {
        LauncherCall::Launch(spec) => Some(spec.args.join(" ")),
        _ => None,
    });
    assert!(
        launched
            .unwrap()
            .contains(&format!("file=/dev/mapper/{device},")),
        "the VMM boots the snapshot"
    );

    // A failure before the snapshot step touches no device.
    core.vms.set_fail_point(Some("snapshot"));
    core.vms.start("web", Events::none()).await.unwrap_err();
    let setups = blockdevs
        .calls()
        .iter()
        .filter(|c| matches!(c, BlockCall::Setup { .. }))
        .count();
    assert_eq!(setups, 1);
    assert!(blockdevs.live().is_empty());
}

#[tokio::test]
async fn a_vmm_the_daemon_never_recorded_is_stopped_at_recovery() {
    let (_tmp, core, launcher) = setup();
    core.vms
        .create(params("web"), Events::none())
        .await
        .unwrap();
    let dir = core.paths.state_dir.join("vms/web");
    // What a daemon killed between spawn and the runtime row leaves: a VMM
    // naming the VM's files, and no record of it.
    use banger_host::ProcessLauncher;
    let orphan = launcher
        .launch(&banger_host::LaunchSpec {
            program: "qemu-system-x86_64".into(),
            args: vec!["-kernel".into(), dir.join("vmlinux").display().to_string()],
            log: dir.join("vmm.log"),
            cwd: None,
            user: None,
        })
        .unwrap();
    // A bystander naming a VM whose name merely starts the same survives.
    let bystander = launcher
        .launch(&banger_host::LaunchSpec {
            program: "qemu-system-x86_64".into(),
            args: vec![format!("{}2/root.ext4", dir.display())],
            log: dir.join("other.log"),
            cwd: None,
            user: None,
        })
        .unwrap();
    core.vms.recover().unwrap();
    assert!(!launcher.alive(orphan), "the orphan was stopped");
    assert!(launcher.alive(bystander));
    assert_eq!(
        core.vms.inspect(&["web".into()]).await.unwrap()[0].state,
        "stopped"
    );
}

#[tokio::test]
async fn a_half_made_vm_directory_is_removed_at_recovery() {
    let (_tmp, core, _launcher) = setup();
    core.vms
        .create(params("web"), Events::none())
        .await
        .unwrap();
    // What a daemon killed mid-create leaves: a directory and no record.
    let half = core.paths.state_dir.join("vms/half");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("root.ext4"), b"partial").unwrap();
    core.vms.recover().unwrap();
    assert!(!half.exists(), "the half-made VM's directory is gone");
    assert!(core.paths.state_dir.join("vms/web/upper.ext4").is_file());
    core.vms
        .create(params("half"), Events::none())
        .await
        .unwrap();
}

/// An image record whose rootfs lives where pulls put it.
fn put_pulled_image(core: &Core, name: &str) -> std::path::PathBuf {
    let dir = core
        .paths
        .images_dir()
        .join(format!("{name}-{}", banger_core::ids::random_hex(4)));
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = dir.join("rootfs.ext4");
    std::fs::write(&rootfs, vec![0u8; 4096]).unwrap();
    core.store()
        .put_image(&ImageInfo {
            name: name.into(),
            r#ref: format!("r/{name}:latest"),
            digest: "sha256:01".into(),
            rootfs_path: rootfs.display().to_string(),
            size_bytes: 4096,
            content_bytes: 1,
            config: ImageConfig::default(),
            created_at: "2026-01-01T00:00:00Z".into(),
            vms: vec![],
        })
        .unwrap();
    rootfs
}

#[tokio::test]
async fn a_layered_vms_image_outlives_its_name_until_the_vm_goes() {
    for mode in [RootMode::DmSnapshot, RootMode::Overlay] {
        let (_tmp, core, launcher, blockdevs) = setup_with(FakeBlockDevices::supported());
        let rootfs = put_pulled_image(&core, "base");
        let p = CreateParams {
            image: "base".into(),
            root_mode: Some(mode),
            ..params("web")
        };
        core.vms.create(p, Events::none()).await.unwrap();
        assert_eq!(core.images.list().unwrap()[0].vms, ["web"]);
        // Removed with -f (a re-pull drops the old rootfs the same way): the
        // VM's image file stays, and so through a daemon restart's cleanup.
        core.images.remove(&["base".into()], true).await.unwrap();
        assert!(rootfs.is_file(), "{mode}: the VM's image file was removed");
        core.images.recover().unwrap();
        assert!(rootfs.is_file(), "{mode}: recovery removed the image file");
        // A newer image under the same name is not what the VM boots on.
        let newer = put_pulled_image(&core, "base");
        core.vms.set_fail_point(Some("agent"));
        core.vms.start("web", Events::none()).await.unwrap_err();
        let booted = match mode {
            RootMode::DmSnapshot => blockdevs.calls().into_iter().find_map(|c| match c {
                BlockCall::Setup { origin, .. } => Some(origin),
                _ => None,
            }),
            _ => launched_args(&launcher)
                .split(' ')
                .find_map(|a| a.strip_prefix("id=image,file="))
                .map(|a| PathBuf::from(a.split(',').next().unwrap())),
        };
        assert_eq!(booted.as_deref(), Some(rootfs.as_path()), "{mode}");
        core.vms.remove(&["web".into()], true).await.unwrap();
        assert!(!rootfs.exists(), "{mode}: the file goes with its last VM");
        assert!(newer.is_file());
    }
}

#[tokio::test]
async fn an_overlay_vm_shares_its_image_read_only_and_copies_nothing() {
    let (tmp, core, launcher) = setup();
    let info = core
        .vms
        .create(params("web"), Events::none())
        .await
        .unwrap();
    assert_eq!(
        info.root_mode, "overlay",
        "the default where the kernel has overlayfs"
    );
    let dir = core.paths.state_dir.join("vms/web");
    assert!(dir.join("upper.ext4").is_file() && !dir.join("root.ext4").exists());
    core.vms.set_fail_point(Some("agent"));
    core.vms.start("web", Events::none()).await.unwrap_err();
    let args = launched_args(&launcher);
    let image = format!(
        "id=image,file={},format=raw,if=none,readonly=on",
        tmp.path().join("rootfs.ext4").display()
    );
    let (image, work, upper) = (
        args.find(&image).expect("the image, read-only"),
        args.find("id=work,").unwrap(),
        args.find(&format!(
            "id=upper,file={}",
            dir.join("upper.ext4").display()
        ))
        .unwrap(),
    );
    assert!(image < work && work < upper, "vda, vdb, vdc: {args}");

    // A mode this host lacks is refused, naming one it has.
    let err = core
        .vms
        .create(
            CreateParams {
                root_mode: Some(RootMode::DmSnapshot),
                ..params("db")
            },
            Events::none(),
        )
        .await
        .unwrap_err();
    assert!(
        err.message.contains("use --root-mode overlay"),
        "{}",
        err.message
    );
    assert!(
        core.vms.inspect(&["db".into()]).await.is_err(),
        "nothing made"
    );
}

/// The arguments of the last VMM launched.
fn launched_args(launcher: &FakeLauncher) -> String {
    launcher
        .calls()
        .into_iter()
        .rev()
        .find_map(|c| match c {
            LauncherCall::Launch(spec) => Some(spec.args.join(" ")),
            _ => None,
        })
        .expect("a launch")
}

#[tokio::test]
async fn image_rm_never_leaves_a_vm_without_its_image() {
    let (_tmp, core, _launcher) = setup();
    for round in 0..20 {
        put_pulled_image(&core, "racy");
        let name = format!("vm{round}");
        let mut p = params(&name);
        p.image = "racy".into();
        let racy = ["racy".to_string()];
        let (created, removed) = tokio::join!(
            core.vms.create(p, Events::none()),
            core.images.remove(&racy, false)
        );
        match (created, removed) {
            (Ok(_), Err(e)) => {
                assert!(e.message.contains("used by VM"), "{}", e.message);
                core.vms.remove(&[name], true).await.unwrap();
                core.images.remove(&["racy".into()], false).await.unwrap();
            }
            (Err(_), Ok(_)) => {}
            (c, r) => panic!(
                "round {round}: create {:?}, image rm {:?}",
                c.map(|_| ()),
                r.map(|_| ())
            ),
        }
    }
}

/// A VMM backend as a test writes it: what it launches, and how its
/// configuration step answers.
struct ScriptedVmm {
    command: fn(&BootSpec) -> Result<banger_host::LaunchSpec, VmmError>,
    configure: fn() -> Result<(), VmmError>,
}

impl Vmm for ScriptedVmm {
    fn kind(&self) -> &'static str {
        "scripted"
    }
    fn transport(&self) -> banger_proto::agent::Transport {
        banger_proto::agent::Transport::Vsock
    }
    fn command(&self, spec: &BootSpec) -> Result<banger_host::LaunchSpec, VmmError> {
        (self.command)(spec)
    }
    fn ctl(&self, dir: &std::path::Path) -> CtlEndpoint {
        CtlEndpoint::Listen(dir.join("ctl.sock"))
    }
    fn ssh_socket(&self, dir: &std::path::Path) -> std::path::PathBuf {
        dir.join("ssh.sock")
    }
    fn run_files(&self) -> &'static [&'static str] {
        &["ctl.sock", "api.sock"]
    }
    fn configure<'a>(
        &'a self,
        _spec: &'a BootSpec,
        _alive: &'a (dyn Fn() -> bool + Send + Sync),
    ) -> futures_util::future::BoxFuture<'a, Result<(), VmmError>> {
        let answer = (self.configure)();
        Box::pin(async move { answer })
    }
}

struct Scripted(
    fn(&BootSpec) -> Result<banger_host::LaunchSpec, VmmError>,
    fn() -> Result<(), VmmError>,
);

impl VmmProvider for Scripted {
    fn vmm(&self, _kind: banger_proto::domain::VmmKind) -> Result<Box<dyn Vmm>, VmmError> {
        Ok(Box::new(ScriptedVmm {
            command: self.0,
            configure: self.1,
        }))
    }
}

/// A VM `web` created with `provider`'s backend, and the error its start ends in.
async fn failed_start(
    provider: Scripted,
) -> (
    tempfile::TempDir,
    Arc<Core>,
    FakeLauncher,
    banger_core::error::OpError,
) {
    let (tmp, core, launcher, _) =
        setup_full(FakeBlockDevices::default(), Some(Arc::new(provider)));
    core.vms
        .create(params("web"), Events::none())
        .await
        .unwrap();
    let err = core.vms.start("web", Events::none()).await.unwrap_err();
    (tmp, core, launcher, err)
}

fn launch_spec(spec: &BootSpec) -> Result<banger_host::LaunchSpec, VmmError> {
    Ok(banger_host::LaunchSpec {
        program: "scripted-vmm".into(),
        args: vec![spec.dir.display().to_string()],
        log: spec.console_log.clone(),
        cwd: Some(spec.dir.clone()),
        user: None,
    })
}

/// The backend's own refusal (as Firecracker's API answers a bad machine
/// config) fails the start at `configure` in the backend's words, and the
/// launched process, runtime row, route and run files are all undone.
#[tokio::test]
async fn a_backend_refusing_its_configuration_fails_the_start_and_is_undone() {
    let provider = Scripted(launch_spec, || {
        Err(VmmError::Api(
            "firecracker refused PUT /machine-config (400): vcpu count must be even".into(),
        ))
    });
    let (_tmp, core, launcher, err) = failed_start(provider).await;
    assert_eq!(err.code, banger_proto::ErrorCode::Internal);
    assert!(
        err.message.contains("failed to boot at stage `configure`")
            && err.message.contains("vcpu count must be even"),
        "{}",
        err.message
    );
    assert_eq!(
        launcher
            .calls()
            .iter()
            .filter(|c| matches!(c, LauncherCall::Launch(_)))
            .count(),
        1
    );
    assert!(launcher.running().is_empty(), "the VMM was stopped");
    assert!(core.store().get_runtime("web").unwrap().is_none());
    assert!(net().routes().is_empty());
    let dir = core.paths.state_dir.join("vms/web");
    assert!(!dir.join("ctl.sock").exists() && !dir.join("initrd.cpio").exists());
}

/// A boot the backend cannot express (a path it cannot carry) is the
/// caller's to fix: invalid params, and no process is launched.
#[tokio::test]
async fn a_boot_the_backend_cannot_express_is_refused_before_launch() {
    let provider = Scripted(
        |_| {
            Err(VmmError::Spec(
                "path /a,b contains a comma, which QEMU options cannot carry".into(),
            ))
        },
        || Ok(()),
    );
    let (_tmp, core, launcher, err) = failed_start(provider).await;
    assert_eq!(
        err.code,
        banger_proto::ErrorCode::InvalidParams,
        "{}",
        err.message
    );
    assert!(err.message.contains("comma"), "{}", err.message);
    assert!(launcher.calls().is_empty(), "nothing launched");
    assert!(core.store().get_runtime("web").unwrap().is_none());
    assert!(net().routes().is_empty());
}
