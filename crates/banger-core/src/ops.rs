//! The operations core: one entry point, [`Core::dispatch`], that every
//! transport calls with a typed [`banger_proto::Request`].

use std::sync::Arc;

use banger_host::ProcessRunner;
use banger_proto::image::RemoveResult;
use banger_proto::rpc::m;
use banger_proto::status::DaemonStatus;
use banger_proto::{Method, Request};
use serde_json::Value;

use crate::config::Config;
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::paths::Paths;
use crate::services::images::{ImageService, PullHooks};
use crate::services::kernels::KernelService;
use crate::services::network::NetworkService;
use crate::services::vms::{GuestIo, Upkeep, VmDeps, VmLifecycle, Vms};
use crate::store::Store;

pub struct Core {
    pub paths: Paths,
    pub images: Arc<ImageService>,
    pub kernels: Arc<KernelService>,
    /// VM lifecycle: create, start, stop, rm, list.
    pub vms: Arc<VmLifecycle>,
    /// Exec, logs and port forwards into running guests.
    pub guest: Arc<GuestIo>,
    /// The background work the daemon runs for its life.
    pub upkeep: Arc<Upkeep>,
    pub workspaces: Arc<crate::services::workspace::WorkspaceService>,
    runner: Arc<dyn ProcessRunner>,
    store: Arc<Store>,
    network: Arc<NetworkService>,
    /// What `daemon status` says of the jailer.
    jailer: String,
}

/// The host side effects the core uses, real or fake.
pub struct Host {
    pub runner: Arc<dyn ProcessRunner>,
    pub launcher: Arc<dyn banger_host::ProcessLauncher>,
    pub blockdevs: Arc<dyn banger_host::BlockDevices>,
    pub net: Arc<dyn banger_host::HostNetwork>,
    /// Whether the privileged operations can work: the daemon is root, or a
    /// root helper answered. `network.mode = auto` follows it.
    pub privileged: bool,
    /// The VMM backends; `None` is the real ones the configuration names.
    pub vmms: Option<Arc<dyn crate::vm::vmm::VmmProvider>>,
    /// Firecracker's jailer, when Firecracker VMs run jailed.
    pub jails: crate::vm::jailing::JailChoice,
}

impl Host {
    /// As root, privileged operations run in-process; otherwise they go to
    /// the root helper the configuration names. VMMs run as the daemon's
    /// user, jailed or not.
    pub fn real(runner: Arc<dyn ProcessRunner>, config: &Config, paths: &Paths) -> Host {
        let launcher = Arc::new(banger_host::RealLauncher);
        if nix::unistd::geteuid().is_root() {
            return Host {
                jails: crate::vm::jailing::JailChoice::in_process(config, paths),
                blockdevs: Arc::new(banger_host::RealBlockDevices {
                    runner: runner.clone(),
                }),
                launcher,
                net: Arc::new(banger_host::RealHostNetwork {
                    runner: runner.clone(),
                }),
                runner,
                privileged: true,
                vmms: None,
            };
        }
        let helper = banger_host::HelperClient::new(config.helper_socket());
        let (privileged, place) = match helper.hello() {
            Ok((version, place)) => {
                tracing::info!(socket = %helper.socket().display(), %version, "using the root helper");
                (true, place)
            }
            Err(e) => {
                tracing::info!(error = %e, "no root helper; VM networking and dm snapshots are off");
                (false, None)
            }
        };
        Host {
            jails: crate::vm::jailing::JailChoice::through_helper(config, paths, &helper, place),
            blockdevs: Arc::new(helper.clone()),
            launcher,
            net: Arc::new(helper),
            runner,
            privileged,
            vmms: None,
        }
    }
}

/// Lines the caller sends after its request (exec stdin, signals), if any.
pub type Input = Option<crate::caller::CallerInput>;

impl Core {
    /// A clean daemon exit: with no VMs left, nothing of this state
    /// directory stays on the host (see [`NetworkService::release_if_idle`]).
    pub fn on_exit(&self) {
        self.network.release_if_idle();
    }

    /// Opens the state under `paths` and clears what an earlier daemon left.
    pub fn open(
        paths: Paths,
        runner: Arc<dyn ProcessRunner>,
        hooks: PullHooks,
    ) -> anyhow::Result<Core> {
        let config = Config::load_with_env(&paths.config_file())?;
        let host = Host::real(runner, &config, &paths);
        Self::open_configured(paths, config, host, hooks)
    }

    /// With the given host side effects (fakes, in tests); the config file
    /// and the environment's overrides are read here, once.
    pub fn open_with(paths: Paths, host: Host, hooks: PullHooks) -> anyhow::Result<Core> {
        let config = Config::load_with_env(&paths.config_file())?;
        Self::open_configured(paths, config, host, hooks)
    }

    /// With the configuration handed in: nothing below reads the environment.
    pub fn open_configured(
        paths: Paths,
        config: Config,
        host: Host,
        hooks: PullHooks,
    ) -> anyhow::Result<Core> {
        let Host {
            runner,
            launcher,
            blockdevs,
            net,
            privileged,
            vmms,
            jails,
        } = host;
        let real_vmms = vmms.is_none();
        let jailer = jails.describe();
        tracing::info!(jailer = %jailer, "Firecracker's jailer");
        let vmms = vmms.unwrap_or_else(|| {
            Arc::new(
                crate::vm::vmm::ConfiguredVmms::new(&config, &paths.state_dir).with_jails(&jails),
            )
        });
        paths.create_all()?;
        // `auto` asks KVM once, in the background, whether it can run a
        // guest here; the first QEMU VM waits for the answer if need be.
        if real_vmms && config.qemu.accel.as_deref().unwrap_or("auto") == "auto" {
            let qemu = config
                .qemu
                .binary
                .clone()
                .unwrap_or_else(|| "qemu-system-x86_64".into());
            let state_dir = paths.state_dir.clone();
            std::thread::spawn(move || {
                let verdict = crate::vm::accel::kvm_verdict(&qemu, &state_dir);
                match verdict.reason {
                    None => tracing::info!("KVM runs guests here: QEMU VMs use it"),
                    Some(reason) => tracing::warn!(
                        %reason,
                        "KVM cannot run guests here: QEMU VMs use TCG (software emulation, slower); \
                         qemu.accel = \"tcg\" skips this probe"
                    ),
                }
            });
        }
        let store = Arc::new(Store::open(&paths.database())?);
        let users_store = store.clone();
        let images =
            ImageService::new(paths.clone(), config.clone(), store.clone(), runner.clone())
                .with_hooks(hooks)
                .with_users(Arc::new(move |image| {
                    users_store.vms_using_image(image).unwrap_or_default()
                }));
        images.recover()?;
        let images = Arc::new(images);
        let kernels = Arc::new(KernelService::new(paths.clone(), store.clone()));
        let network = Arc::new(
            NetworkService::new(&config, net, privileged, store.clone())
                .with_owner_file(paths.network_owner_file()),
        );
        let Vms {
            lifecycle: vms,
            guest,
            upkeep,
            workspaces,
        } = Vms::new(VmDeps {
            paths: paths.clone(),
            config,
            store: store.clone(),
            runner: runner.clone(),
            launcher,
            blockdevs,
            jails: jails.jails(),
            images: images.clone(),
            kernels: kernels.clone(),
            network: network.clone(),
            vmms,
        });
        vms.recover()
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        // Guests a snapshot left paused or held by a daemon that died run
        // again; in the background, as each may take a guest's answer.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let vms = vms.clone();
            runtime.spawn(async move { vms.recover_snapshots().await });
        }
        // A broken network must not keep the daemon from serving the rest.
        match network.reconcile().and_then(|()| network.start_dns()) {
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e.message, "VM networking is not fully up"),
        }
        Ok(Core {
            paths,
            images,
            kernels,
            vms,
            guest,
            upkeep,
            workspaces,
            runner,
            store,
            network,
            jailer,
        })
    }

    /// Decodes a request from its wire parts (a method name and JSON
    /// params) and handles it, for callers that hold requests that way.
    pub async fn dispatch(
        &self,
        method: &str,
        params: Value,
        events: Events<Value>,
    ) -> OpResult<Value> {
        let request = Request::from_parts(method, params).map_err(OpError::from)?;
        self.handle(request, events, None).await
    }

    /// Handles one typed request. Each arm is checked by the compiler
    /// against its method's result and event types.
    pub async fn handle(
        &self,
        request: Request,
        events: Events<Value>,
        input: Input,
    ) -> OpResult<Value> {
        let ev = &events;
        match request {
            Request::DaemonStatus(_) => answer::<m::DaemonStatus>(self.status()),
            Request::ImagePull(p) => {
                answer::<m::ImagePull>(self.images.pull(p, typed::<m::ImagePull>(ev)).await)
            }
            Request::ImageImport(p) => {
                answer::<m::ImageImport>(self.images.import(p, typed::<m::ImageImport>(ev)).await)
            }
            Request::ImageList(_) => answer::<m::ImageList>(self.images.list()),
            Request::ImageInspect(p) => answer::<m::ImageInspect>(self.images.inspect(&p.names)),
            Request::ImageRemove(p) => {
                let removed = self.images.remove(&p.names, p.force).await;
                // An image's warm templates go with it.
                if let Ok(r) = &removed {
                    self.vms.drop_templates(&r.removed).await;
                }
                answer::<m::ImageRemove>(removed)
            }
            Request::ImageWarm(p) => {
                answer::<m::ImageWarm>(self.vms.warm(p, typed::<m::ImageWarm>(ev)).await)
            }
            Request::ImageCachePrune(p) => {
                answer::<m::ImageCachePrune>(self.images.prune_cache(p.dry_run).await)
            }
            Request::KernelImport(p) => answer::<m::KernelImport>(self.kernels.import(p).await),
            Request::KernelPull(p) => answer::<m::KernelPull>(
                crate::services::kernel_pull::pull(
                    &self.images,
                    &self.kernels,
                    self.runner.as_ref(),
                    &self.paths,
                    p,
                    typed::<m::KernelPull>(ev),
                )
                .await,
            ),
            Request::KernelList(_) => answer::<m::KernelList>(self.kernels.list()),
            Request::KernelInspect(p) => answer::<m::KernelInspect>(self.kernels.inspect(&p.names)),
            Request::KernelRemove(p) => answer::<m::KernelRemove>(
                self.kernels
                    .remove(&p.names, p.force)
                    .await
                    .map(|removed| RemoveResult { removed }),
            ),
            Request::VmCreate(p) => {
                answer::<m::VmCreate>(self.vms.create(p, typed::<m::VmCreate>(ev)).await)
            }
            Request::VmStart(p) => {
                answer::<m::VmStart>(self.vms.start(&p.name, typed::<m::VmStart>(ev)).await)
            }
            Request::VmStop(p) => {
                answer::<m::VmStop>(self.vms.stop(&p.name, stop_timeout(p.timeout_secs)).await)
            }
            Request::VmRestart(p) => answer::<m::VmRestart>(
                self.vms
                    .restart(
                        &p.name,
                        stop_timeout(p.timeout_secs),
                        typed::<m::VmRestart>(ev),
                    )
                    .await,
            ),
            Request::VmRemove(p) => answer::<m::VmRemove>(
                self.vms
                    .remove(&p.names, p.force)
                    .await
                    .map(|removed| RemoveResult { removed }),
            ),
            Request::VmList(_) => answer::<m::VmList>(self.vms.list()),
            Request::VmInspect(p) => answer::<m::VmInspect>(self.vms.inspect(&p.names).await),
            Request::VmLogs(p) => answer::<m::VmLogs>(
                self.guest
                    .logs(&p.name, p.tail, p.follow, typed::<m::VmLogs>(ev), input)
                    .await,
            ),
            Request::VmSync(p) => {
                answer::<m::VmSync>(self.workspaces.sync(p, typed::<m::VmSync>(ev)).await)
            }
            Request::VmExec(p) => {
                answer::<m::VmExec>(self.guest.exec(p, typed::<m::VmExec>(ev), input).await)
            }
            Request::VmPortForward(p) => answer::<m::VmPortForward>(
                self.guest
                    .port_forward(p, typed::<m::VmPortForward>(ev), input)
                    .await,
            ),
            Request::VmStats(p) => answer::<m::VmStats>(self.vms.stats(&p.names).await),
            Request::VmSet(p) => answer::<m::VmSet>(self.vms.set(p, typed::<m::VmSet>(ev)).await),
            Request::VmPause(p) => answer::<m::VmPause>(self.vms.pause(&p.name).await),
            Request::VmResume(p) => answer::<m::VmResume>(self.vms.resume(&p.name).await),
            Request::VmSnapshot(p) => {
                answer::<m::VmSnapshot>(self.vms.snapshot(p, typed::<m::VmSnapshot>(ev)).await)
            }
            Request::VmRestore(p) => {
                answer::<m::VmRestore>(self.vms.restore(p, typed::<m::VmRestore>(ev)).await)
            }
            Request::SnapshotList(_) => answer::<m::SnapshotList>(self.vms.snapshots()),
            Request::SnapshotInspect(p) => {
                answer::<m::SnapshotInspect>(self.vms.inspect_snapshots(&p.names))
            }
            Request::SnapshotRemove(p) => answer::<m::SnapshotRemove>(
                self.vms
                    .remove_snapshots(&p.names, p.force)
                    .await
                    .map(|removed| RemoveResult { removed }),
            ),
        }
    }

    /// The state store, for tests that set up records directly.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn status(&self) -> OpResult<DaemonStatus> {
        Ok(DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: banger_proto::PROTOCOL_VERSION,
            pid: std::process::id(),
            uid: nix::unistd::geteuid().as_raw(),
            socket: self.paths.socket().display().to_string(),
            state_dir: self.paths.state_dir.display().to_string(),
            cache_dir: self.paths.cache_dir.display().to_string(),
            images: self.store.list_images()?.len() as u64,
            network: Some(match self.network.describe() {
                Ok(s) => banger_proto::status::NetworkStatus::Ok(s),
                Err(e) => banger_proto::status::NetworkStatus::Error(e.to_string()),
            }),
            dns: self
                .network
                .dns_addr()
                .map(|addr| banger_proto::status::DnsStatus {
                    addr: addr.to_string(),
                    domain: self.network.domain().to_string(),
                    device: self.network.gateway_dev(),
                }),
            jailer: Some(self.jailer.clone()),
        })
    }
}

fn stop_timeout(secs: Option<u64>) -> std::time::Duration {
    std::time::Duration::from_secs(secs.unwrap_or(10))
}

/// The event channel as method `M`'s events.
fn typed<M: Method>(events: &Events<Value>) -> Events<M::Event> {
    events.retyped()
}

/// Method `M`'s result, as the frame carries it.
fn answer<M: Method>(result: OpResult<M::Result>) -> OpResult<Value> {
    serde_json::to_value(result?).map_err(|e| OpError::internal(e.to_string()))
}
