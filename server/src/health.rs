//! `grpc.health.v1.Health`, the standard gRPC health service, as etcd serves it: the empty
//! service name (every etcd service) is `SERVING` while the member runs; any other name is
//! unknown (`Check`: `NotFound`, "unknown service"; `Watch`: one `SERVICE_UNKNOWN`, then the
//! stream stays open, as grpc-go's health server does). Kubernetes' gRPC probes and gRPC
//! clients' health checking call it. The HTTP `/health` check ([`crate::http`]) is the one
//! that looks at leader, quorum and alarms.

use std::sync::Arc;

use futures::StreamExt as _;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::node::{KeelNode, ResponseStream};

/// The service name whose status is the whole member's (etcd registers only this one).
const ALL_SERVICES: &str = "";

pub struct HealthService {
    node: Arc<KeelNode>,
}

impl HealthService {
    pub fn new(node: Arc<KeelNode>) -> Self {
        Self { node }
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    #[tracing::instrument(skip_all, name = "Health.Check")]
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        if request.get_ref().service != ALL_SERVICES {
            return Err(Status::not_found("unknown service"));
        }
        Ok(Response::new(response(ServingStatus::Serving)))
    }

    type WatchStream = ResponseStream<HealthCheckResponse>;

    #[tracing::instrument(skip_all, name = "Health.Watch")]
    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let status = if request.get_ref().service == ALL_SERVICES {
            ServingStatus::Serving
        } else {
            ServingStatus::ServiceUnknown
        };
        // The status never changes while the member runs; the stream ends when it stops.
        let updates = futures::stream::once(async move { Ok(response(status)) })
            .chain(futures::stream::pending());
        Ok(Response::new(self.node.until_stopping(Box::pin(updates))))
    }
}
