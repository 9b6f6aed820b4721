//! The GitOps hook: action::gitops suspends Argo CD / Flux through this executor's client,
//! retries and error classification, so its calls are reported like the revert's own.

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::Value;

use super::error::Op;
use super::executor::OnStep;
use super::{KubeError, KubeExecutor};
use crate::action::gitops::Call;
use crate::action::retry::BeforeWrite;

impl KubeExecutor {
    /// GET, or merge PATCH (with the field manager, `dryRun=All` in a dry run), of the GitOps
    /// owner object; the object comes back as JSON.
    /// `gate` is awaited before a PATCH's retries ([`KubeExecutor::call_gated`]).
    pub(in crate::action) async fn gitops_call(
        &self,
        c: Call<'_>,
        on_step: OnStep<'_>,
        gate: Option<BeforeWrite<'_>>,
    ) -> Result<Value, KubeError> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), c.owner.namespace(), &c.owner.api_resource());
        let op = Op {
            verb: if c.patch.is_some() { "patch" } else { "get" },
            kind: c.owner.kind(),
            api_group: c.owner.group(),
            resource: c.owner.resource(),
            namespace: c.owner.namespace(),
            name: c.owner.name(),
        };
        let name = c.owner.name();
        let obj = match c.patch {
            None => self.call(op, on_step, || api.get(name)).await?,
            Some(body) => {
                let pp = PatchParams {
                    dry_run: c.dry_run,
                    field_manager: Some(self.field_manager.clone()),
                    ..PatchParams::default()
                };
                let patch = Patch::Merge(body);
                self.call_gated(op, on_step, gate, || api.patch(name, &pp, &patch))
                    .await?
            }
        };
        serde_json::to_value(&obj).map_err(|e| KubeError::internal(format!("{}: {e}", op.describe())))
    }

    /// Re-reads after a lost resourceVersion race, as for the revert's own writes.
    pub(in crate::action) fn max_conflict_retries(&self) -> u32 {
        self.max_conflict_retries
    }
}
