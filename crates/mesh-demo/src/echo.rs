//! `mesh.test.v1.Echo`: a service the route layer has never seen, for the layer's tests.
//!
//! It counts nothing itself: the route layer counts every call of a spread rule while it runs
//! (as a server that only adds the layer would be). The response metadata reports what the call looked like when it arrived: `x-seen-forwarded-by`
//! (the `x-mesh-forwarded-by` header, empty when it came straight from a client) and
//! `x-seen-grpc-timeout` (the deadline that was left).

use std::{pin::Pin, time::Duration};

use futures::Stream;
use mesh::{NodeId, route::FORWARDED_BY};
use tonic::{Request, Response, Status, metadata::MetadataValue};

use crate::proto::test::v1::{
    CountRequest, EchoReply, EchoRequest, LookupRequest, Tick, echo_server,
};

/// The echo service of one node.
#[derive(Debug, Clone)]
pub struct EchoService {
    node_id: NodeId,
}

impl EchoService {
    /// Serves as `node_id`.
    pub fn new(node_id: NodeId) -> Self {
        Self { node_id }
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> echo_server::EchoServer<Self> {
        echo_server::EchoServer::new(self)
    }

    fn reply<T>(&self, request_metadata: &tonic::metadata::MetadataMap, message: T) -> Response<T> {
        let mut response = Response::new(message);
        for (seen, header) in [
            ("x-seen-forwarded-by", FORWARDED_BY),
            ("x-seen-grpc-timeout", "grpc-timeout"),
        ] {
            let value = request_metadata
                .get(header)
                .cloned()
                .unwrap_or_else(|| MetadataValue::from_static(""));
            response.metadata_mut().insert(seen, value);
        }
        response
    }
}

/// The stream type of `Count`.
pub type TickStream = Pin<Box<dyn Stream<Item = Result<Tick, Status>> + Send>>;

#[tonic::async_trait]
impl echo_server::Echo for EchoService {
    type CountStream = TickStream;

    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = request.get_ref();
        // No timer when nothing is held: tokio rounds even a zero sleep up to its next
        // millisecond tick, which made every call cost about 1 ms.
        if message.hold_ms > 0 {
            tokio::time::sleep(Duration::from_millis(message.hold_ms)).await;
        }
        let reply = EchoReply {
            payload: message.payload.clone(),
            served_by: self.node_id.to_string(),
        };
        Ok(self.reply(request.metadata(), reply))
    }

    async fn count(&self, request: Request<CountRequest>) -> Result<Response<TickStream>, Status> {
        let message = request.get_ref().clone();
        let served_by = self.node_id.to_string();
        let ticks = futures::stream::unfold(0, move |index| {
            let served_by = served_by.clone();
            let payload = message.payload.clone();
            async move {
                if index >= message.count {
                    // Linger before the end of the stream (the trailers).
                    tokio::time::sleep(Duration::from_millis(message.linger_ms)).await;
                    return None;
                }
                if index > 0 {
                    tokio::time::sleep(Duration::from_millis(message.interval_ms)).await;
                }
                let tick = Tick {
                    index,
                    served_by,
                    payload,
                    last: index + 1 == message.count,
                };
                Some((Ok(tick), index + 1))
            }
        });
        Ok(self.reply(request.metadata(), Box::pin(ticks) as TickStream))
    }

    async fn lookup(&self, request: Request<LookupRequest>) -> Result<Response<EchoReply>, Status> {
        let reply = EchoReply {
            payload: request.get_ref().name.clone().into_bytes(),
            served_by: self.node_id.to_string(),
        };
        Ok(self.reply(request.metadata(), reply))
    }
}
