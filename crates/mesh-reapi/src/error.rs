//! Errors as the Remote Execution API wants them on the wire.
//!
//! * Missing blobs: `FAILED_PRECONDITION` with a `google.rpc.PreconditionFailure` detail whose
//!   violations are all of type `MISSING` with subject `blobs/{hash}/{size}`: Bazel re-uploads
//!   them and retries (Bazel's `ExecuteRetrier`), other clients do the same.
//! * Malformed requests (digests, resource names, actions, commands): `INVALID_ARGUMENT`,
//!   the message naming the value and the rule.
//! * Our own failures (file system): `INTERNAL`.
//!
//! A status travels either as the gRPC status of a call ([`tonic::Status`], details in
//! `grpc-status-details-bin`) or inside an `ExecuteResponse` (a `google.rpc.Status` message);
//! both carry the same details.

use bazel_remote_apis::google::{protobuf::Any, rpc};
use prost::Message as _;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::{
    ActionCacheError, CasError, ClusterError, DigestError, MissingBlobs, ResourceNameError,
    executor::ExecError,
};

/// The violation type Bazel looks for.
const MISSING: &str = "MISSING";

fn violation_description() -> &'static str {
    "the blob is on no replica of the cluster; upload it and retry"
}

/// `FAILED_PRECONDITION` naming every missing blob, as a call's status.
pub(crate) fn missing_status(missing: &MissingBlobs) -> Status {
    let mut details = ErrorDetails::new();
    for digest in &missing.0 {
        details.add_precondition_failure_violation(
            MISSING,
            digest.missing_subject(),
            violation_description(),
        );
    }
    Status::with_error_details(Code::FailedPrecondition, missing.to_string(), details)
}

/// The same, as a `google.rpc.Status` message (for `ExecuteResponse.status`).
pub(crate) fn missing_rpc_status(missing: &MissingBlobs) -> rpc::Status {
    let failure = tonic_types::pb::PreconditionFailure {
        violations: missing
            .0
            .iter()
            .map(|digest| tonic_types::pb::precondition_failure::Violation {
                r#type: MISSING.to_owned(),
                subject: digest.missing_subject(),
                description: violation_description().to_owned(),
            })
            .collect(),
    };
    rpc::Status {
        code: Code::FailedPrecondition as i32,
        message: missing.to_string(),
        details: vec![Any {
            type_url: "type.googleapis.com/google.rpc.PreconditionFailure".to_owned(),
            value: failure.encode_to_vec(),
        }],
    }
}

/// A `google.rpc.Status` without details.
pub(crate) fn rpc_status(code: Code, message: impl Into<String>) -> rpc::Status {
    rpc::Status {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    }
}

/// An execution failure as the `status` of its `ExecuteResponse`.
pub(crate) fn exec_rpc_status(error: &ExecError) -> rpc::Status {
    match error {
        ExecError::Missing(missing) => missing_rpc_status(missing),
        ExecError::Invalid(message) => rpc_status(Code::InvalidArgument, message.clone()),
        ExecError::OutputType(message) => rpc_status(Code::FailedPrecondition, message.clone()),
        ExecError::Internal { .. } => rpc_status(Code::Internal, error.to_string()),
    }
}

pub(crate) fn invalid(error: impl std::fmt::Display) -> Status {
    Status::invalid_argument(error.to_string())
}

impl From<DigestError> for Status {
    fn from(error: DigestError) -> Self {
        invalid(error)
    }
}

impl From<ResourceNameError> for Status {
    fn from(error: ResourceNameError) -> Self {
        invalid(error)
    }
}

impl From<MissingBlobs> for Status {
    fn from(missing: MissingBlobs) -> Self {
        missing_status(&missing)
    }
}

impl From<CasError> for Status {
    fn from(error: CasError) -> Self {
        match &error {
            CasError::DigestMismatch { .. }
            | CasError::TooMuchData { .. }
            | CasError::TooLarge { .. } => invalid(error),
            CasError::Corrupt { .. } => Status::not_found(error.to_string()),
            CasError::Io { .. } => Status::internal(error.to_string()),
        }
    }
}

impl From<ActionCacheError> for Status {
    fn from(error: ActionCacheError) -> Self {
        match &error {
            ActionCacheError::TooLarge { .. } => invalid(error),
            ActionCacheError::Io { .. } => Status::internal(error.to_string()),
        }
    }
}

impl From<ClusterError> for Status {
    fn from(error: ClusterError) -> Self {
        match error {
            ClusterError::Missing(missing) => missing_status(&missing),
            ClusterError::Cas(error) => error.into(),
            ClusterError::ActionCache(error) => error.into(),
            ClusterError::Malformed { .. } | ClusterError::MessageTooLarge { .. } => invalid(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;

    #[test]
    fn missing_blobs_carry_a_precondition_failure_bazel_understands() {
        let missing = MissingBlobs(vec![Digest::of(b"a"), Digest::of(b"bb")]);
        let status = missing_status(&missing);
        assert_eq!(status.code(), Code::FailedPrecondition);
        let failure = status.get_details_precondition_failure().unwrap();
        let subjects: Vec<&str> = failure
            .violations
            .iter()
            .map(|v| v.subject.as_str())
            .collect();
        assert_eq!(
            subjects,
            [
                Digest::of(b"a").missing_subject().as_str(),
                Digest::of(b"bb").missing_subject().as_str()
            ]
        );
        assert!(failure.violations.iter().all(|v| v.r#type == "MISSING"));

        let embedded = missing_rpc_status(&missing);
        assert_eq!(embedded.code, Code::FailedPrecondition as i32);
        let any = &embedded.details[0];
        assert_eq!(
            any.type_url,
            "type.googleapis.com/google.rpc.PreconditionFailure"
        );
        let decoded = tonic_types::pb::PreconditionFailure::decode(any.value.as_slice()).unwrap();
        assert_eq!(decoded.violations.len(), 2);
        assert_eq!(decoded.violations[0].subject, subjects[0]);
    }
}
