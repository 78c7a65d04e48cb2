//! Warm starts: `image warm IMG` boots IMG once and keeps the ready VM as a
//! snapshot, the image's template for those settings; `vm run --image IMG`
//! with the same settings then forks the template (a fraction of a boot)
//! instead of booting, unless `--cold`. A template is named by what it must
//! match (the image's file, the kernel's, VMM, sizes, root mode), so a
//! re-pulled image, a re-imported kernel or other settings never find it; one made by another agent build
//! is stale and ignored (and replaced by the next `image warm`).

use banger_proto::image::ImageInfo;
use banger_proto::vm::{CreateParams, SnapshotInfo, SnapshotParams, VmEvent, WarmParams};
use sha2::{Digest, Sha256};

use super::lifecycle::{Plan, VmLifecycle};
use crate::error::{OpError, OpResult};
use crate::events::Events;
use crate::store::SnapshotRecord;

/// The template's name for an image file and settings.
fn template_name(image: &ImageInfo, plan: &Plan) -> String {
    let key = format!(
        "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
        image.rootfs_path,
        plan.kernel.name,
        // A kernel imported anew under the same name is another kernel.
        plan.kernel.vmlinux_path,
        plan.vmm.as_str(),
        plan.vcpus,
        plan.memory_mib,
        plan.disk_bytes,
        plan.work_disk_bytes,
        plan.root_mode.as_str()
    );
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("warm-{hex}")
}

impl VmLifecycle {
    /// `image warm IMG [--kernel K] [--vcpus N] [--memory M]`.
    pub async fn warm(&self, p: WarmParams, events: Events<VmEvent>) -> OpResult<SnapshotInfo> {
        let image = self
            .images
            .inspect(std::slice::from_ref(&p.image))?
            .remove(0);
        let params = CreateParams {
            image: image.name.clone(),
            kernel: p.kernel.clone(),
            vcpus: p.vcpus,
            memory_mib: p.memory_mib,
            ..Default::default()
        };
        let plan = self.plan(&params, &image)?;
        if let Some(fresh) = self.template_for(&image, &plan).await? {
            return self
                .inspect_snapshots(&[fresh.name])
                .map(|mut v| v.remove(0));
        }
        let name = template_name(&image, &plan);
        // A stale one (another agent) goes first.
        self.remove_snapshots(std::slice::from_ref(&name), true)
            .await?;
        let agent = self.agent_tag().await?;
        let booted = format!("warming-{}", crate::ids::random_hex(4));
        let made = async {
            self.create(
                CreateParams {
                    name: booted.clone(),
                    kernel: Some(plan.kernel.name.clone()),
                    vmm: Some(plan.vmm),
                    vcpus: Some(plan.vcpus),
                    memory_mib: Some(plan.memory_mib),
                    root_mode: Some(plan.root_mode),
                    start: true,
                    cold: true,
                    ..params.clone()
                },
                events.clone(),
            )
            .await?;
            let snapshot = SnapshotParams {
                name: booted.clone(),
                snapshot: name.clone(),
                stop: false,
            };
            self.snapshot(snapshot, events.clone()).await?;
            self.registry
                .store
                .set_template(&name, &image.name, &agent)?;
            Ok::<_, OpError>(())
        }
        .await;
        // The VM booted for it goes, whatever happened.
        let _ = self.remove(std::slice::from_ref(&booted), true).await;
        made?;
        tracing::info!(image = %image.name, template = %name, "image warmed");
        self.inspect_snapshots(&[name]).map(|mut v| v.remove(0))
    }

    /// The image's warm template for these settings, if it is current.
    pub(super) async fn template_for(
        &self,
        image: &ImageInfo,
        plan: &Plan,
    ) -> OpResult<Option<SnapshotRecord>> {
        let Some(t) = self
            .registry
            .store
            .get_snapshot(&template_name(image, plan))?
        else {
            return Ok(None);
        };
        let agent = self.agent_tag().await?;
        let current = t.template.as_deref() == Some(image.name.as_str())
            && t.with_memory
            && t.agent.as_deref() == Some(agent.as_str());
        if !current {
            tracing::info!(template = %t.name, "the image's warm template is stale; booting");
        }
        Ok(current.then_some(t))
    }

    /// Drops the warm templates of removed images.
    pub async fn drop_templates(&self, images: &[String]) {
        for image in images {
            let names: Vec<String> = self
                .registry
                .store
                .templates_of(image)
                .unwrap_or_default()
                .into_iter()
                .map(|t| t.name)
                .collect();
            if let Err(e) = self.remove_snapshots(&names, true).await {
                tracing::warn!(image = %image, error = %e.message, "cannot remove warm templates");
            }
        }
    }

    async fn agent_tag(&self) -> OpResult<String> {
        let agent = crate::agent_bin::locate(self.registry.config.agent_binary.as_deref())?;
        self.kernels.agent_tag(&agent).await
    }
}
