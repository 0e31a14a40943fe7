//! What the embedder declares per gRPC method: where its calls should run.

use std::{fmt, future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use tonic::{Status, metadata::MetadataMap};

use crate::select::RouteRequest;

/// Where a call with a *spread* rule should run, as the rule's function decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep it on this node: the inner service handles it (for example an action-cache hit,
    /// which must never cost a forward).
    Local,
    /// Route it by the router's strategy and [`crate::WhenFull`] among the nodes that meet
    /// these requirements (this node included).
    Route(RouteRequest),
}

type DecideFn = dyn Fn(Bytes, MetadataMap) -> Pin<Box<dyn Future<Output = Result<Decision, Status>> + Send>>
    + Send
    + Sync;
type OwnerFn = dyn Fn(Bytes) -> Result<String, Status> + Send + Sync;
type FinalFn = dyn Fn(Bytes) -> bool + Send + Sync;

#[derive(Clone)]
pub(crate) enum RuleKind {
    Spread(Arc<DecideFn>),
    ToOwner(Arc<OwnerFn>),
}

/// How the [`RouteLayer`](super::RouteLayer) treats the calls of one gRPC method.
///
/// * [`Rule::spread`]: new work. The first request message is decoded only to ask the rule's
///   function for a [`Decision`]; the call then runs here or on the peer the router picks.
/// * [`Rule::to_owner`]: a call about existing work. The operation name read from the request
///   is parsed as an [`OperationId`](crate::OperationId) and the call goes to the node that
///   owns it (`NOT_FOUND` when the owner is gone, `INVALID_ARGUMENT` when the name is
///   malformed).
/// * [`Rule::idempotent`]: a spread call whose peer dies before the response is complete is
///   routed again (to another peer or here) and the client's stream continues; never for rules
///   not marked so.
#[derive(Clone)]
pub struct Rule {
    pub(crate) kind: RuleKind,
    pub(crate) idempotent: bool,
    pub(crate) is_final: Option<Arc<FinalFn>>,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RuleKind::Spread(_) => "spread",
            RuleKind::ToOwner(_) => "to_owner",
        };
        f.debug_struct("Rule")
            .field("kind", &kind)
            .field("idempotent", &self.idempotent)
            .field("recognises_final_message", &self.is_final.is_some())
            .finish()
    }
}

impl Rule {
    /// Whether the rule's calls are new work (spread), which the layer counts while they
    /// run here; an operation's follow-up (to owner) adds none.
    pub(crate) fn spreads(&self) -> bool {
        matches!(self.kind, RuleKind::Spread(_))
    }

    /// New work, spread over the cluster: `decide` gets the first request message (decoded as
    /// `M`) and the call's metadata, and answers [`Decision::Local`] or
    /// [`Decision::Route`]. It may be async (read the CAS, look up a cache); an error it
    /// returns is the client's answer.
    ///
    /// ```
    /// use mesh_route::{Decision, RouteRequest, layer::Rule};
    ///
    /// # #[derive(Clone, PartialEq, prost::Message)]
    /// # struct BuildRequest { #[prost(string, tag = "1")] os: String }
    /// let rule = Rule::spread(|request: BuildRequest, _metadata| async move {
    ///     Ok(Decision::Route(RouteRequest::new().require_tag("os", request.os)))
    /// })
    /// .idempotent();
    /// ```
    pub fn spread<M, F, Fut>(decide: F) -> Self
    where
        M: prost::Message + Default + 'static,
        F: Fn(M, MetadataMap) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Decision, Status>> + Send + 'static,
    {
        let decide: Arc<DecideFn> =
            Arc::new(
                move |message: Bytes, metadata: MetadataMap| match M::decode(message) {
                    Ok(message) => Box::pin(decide(message, metadata)),
                    Err(error) => Box::pin(std::future::ready(Err(undecodable::<M>(&error)))),
                },
            );
        Self {
            kind: RuleKind::Spread(decide),
            idempotent: false,
            is_final: None,
        }
    }

    /// A call about an existing operation, sent to the node that owns it: `name` reads the
    /// operation name (`{node_id}:{uuid}`, behind any `…/` prefix) from the request message.
    ///
    /// ```
    /// use mesh_route::layer::Rule;
    ///
    /// # #[derive(Clone, PartialEq, prost::Message)]
    /// # struct WaitRequest { #[prost(string, tag = "1")] name: String }
    /// let rule = Rule::to_owner(|request: &WaitRequest| request.name.clone());
    /// ```
    pub fn to_owner<M, F>(name: F) -> Self
    where
        M: prost::Message + Default + 'static,
        F: Fn(&M) -> String + Send + Sync + 'static,
    {
        let name: Arc<OwnerFn> = Arc::new(move |message: Bytes| {
            M::decode(message)
                .map(|message| name(&message))
                .map_err(|error| undecodable::<M>(&error))
        });
        Self {
            kind: RuleKind::ToOwner(name),
            idempotent: false,
            is_final: None,
        }
    }

    /// Marks the method idempotent: the same request may run twice without harm (REAPI's
    /// `Execute`: the action digest names the work). If the peer running a call dies before
    /// the final response, the call is routed again, excluding that peer, and the client's
    /// stream continues with the new node's messages. Only [`Rule::spread`] calls are
    /// re-routed; a call sent to its owner has nowhere else to go.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Recognises the response message that completes the call (REAPI: the `Operation` with
    /// `done` set). An idempotent call whose peer dies *after* relaying that message is not
    /// run again: the client already has its answer, and the stream ends with `OK`. Without
    /// this, only the trailers mark completion. The relay decodes a copy of each response
    /// message as `R` to ask; the bytes the client gets are untouched.
    ///
    /// ```
    /// use mesh_route::{Decision, RouteRequest, layer::Rule};
    ///
    /// # #[derive(Clone, PartialEq, prost::Message)]
    /// # struct ExecuteRequest { #[prost(string, tag = "1")] digest: String }
    /// # #[derive(Clone, PartialEq, prost::Message)]
    /// # struct Operation { #[prost(bool, tag = "3")] done: bool }
    /// let rule = Rule::spread(|_: ExecuteRequest, _| async { Ok(Decision::Route(RouteRequest::new())) })
    ///     .idempotent()
    ///     .final_message(|operation: &Operation| operation.done);
    /// ```
    pub fn final_message<R, F>(mut self, is_final: F) -> Self
    where
        R: prost::Message + Default + 'static,
        F: Fn(&R) -> bool + Send + Sync + 'static,
    {
        self.is_final = Some(Arc::new(move |message: Bytes| {
            R::decode(message).is_ok_and(|message| is_final(&message))
        }));
        self
    }

    /// Whether `messages` (whole, length-prefixed gRPC messages) include the final one.
    pub(crate) fn completes(&self, messages: &Bytes) -> bool {
        let Some(is_final) = &self.is_final else {
            return false;
        };
        super::grpc::messages(messages).any(|message| is_final(message))
    }
}

fn undecodable<M>(error: &prost::DecodeError) -> Status {
    Status::invalid_argument(format!(
        "the request message could not be decoded as {}: {error}",
        std::any::type_name::<M>()
    ))
}
