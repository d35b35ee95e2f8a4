//! The CSI Identity service: who the driver is and what it offers.

use tonic::{Request, Response, Status};

use crate::cairnd::Cairnd;
use crate::pb::identity_server::Identity;
use crate::pb::plugin_capability::{self, service, volume_expansion};
use crate::pb::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

pub struct IdentityService {
    name: String,
    cairnd: Cairnd,
    /// The controller service runs in this process.
    controller: bool,
}

impl IdentityService {
    pub(crate) fn new(name: &str, cairnd: Cairnd, controller: bool) -> IdentityService {
        IdentityService {
            name: name.to_string(),
            cairnd,
            controller,
        }
    }
}

fn service(t: service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: crate::VERSION.to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        // Online when this node's kernel resizes a live /dev/ublkbN
        // (UBLK_F_UPDATE_SIZE, Linux 6.16+); detached volumes grow anywhere.
        // A node whose cairnd does not answer says offline, the safe claim.
        let online = match self.cairnd.client().await {
            Ok(mut c) => c
                .get_node(cairn_api::pb::GetNodeRequest {})
                .await
                .is_ok_and(|n| n.into_inner().online_expansion),
            Err(_) => false,
        };
        let expansion = if online {
            volume_expansion::Type::Online
        } else {
            volume_expansion::Type::Offline
        };
        let mut capabilities = vec![
            service(service::Type::VolumeAccessibilityConstraints),
            PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: expansion as i32,
                    },
                )),
            },
        ];
        if self.controller {
            capabilities.insert(0, service(service::Type::ControllerService));
        }
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    /// Ready when the local cairnd answers.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let mut c = self
            .cairnd
            .client()
            .await
            .map_err(|e| Status::failed_precondition(e.message().to_string()))?;
        c.get_node(cairn_api::pb::GetNodeRequest {})
            .await
            .map_err(|e| Status::failed_precondition(format!("cairnd: {}", e.message())))?;
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}
