//! `build.bazel.remote.execution.v2.Capabilities`: what this server offers.
//!
//! Exactly what Bazel 4.2.3 checks before anything else (see `REAPI-NOTES.md`): API versions
//! with 2.0 inside `low..=high`, execution enabled with SHA-256 (the deprecated single
//! `digest_function`), SHA-256 among the cache's digest functions; BLAKE3 offered next to it
//! for clients that pick it ([`crate::DigestFunction`]); plus the batch limit ([`MAX_BATCH_TOTAL_SIZE`]), the largest blob the CAS
//! can hold, action cache updates enabled, and zstd for ByteStream and batch calls
//! ([`crate::compression`]). No blob splitting is offered, so clients never use it.

use bazel_remote_apis::build::bazel::{
    remote::execution::v2::{
        ActionCacheUpdateCapabilities, CacheCapabilities, ExecutionCapabilities,
        GetCapabilitiesRequest, PriorityCapabilities, ServerCapabilities,
        capabilities_server::{Capabilities, CapabilitiesServer},
        compressor, digest_function,
        priority_capabilities::PriorityRange,
        symlink_absolute_path_strategy,
    },
    semver::SemVer,
};
use tonic::{Request, Response, Status};

use crate::{DigestFunction, peers::MAX_BATCH_TOTAL_SIZE};

/// The highest REAPI version this server speaks: v2.1 added `output_paths`, which the
/// executor honours; later additions (blob splitting, v2.12+) are not offered.
const HIGH_API_VERSION: (i32, i32) = (2, 1);

/// The `Capabilities` service.
#[derive(Debug, Clone)]
pub struct CapabilitiesService {
    max_cas_blob_size: u64,
}

impl CapabilitiesService {
    /// Capabilities of a server whose CAS holds blobs of at most `max_cas_blob_size` bytes.
    pub fn new(max_cas_blob_size: u64) -> Self {
        Self { max_cas_blob_size }
    }

    /// The tonic service.
    pub fn into_server(self) -> CapabilitiesServer<Self> {
        CapabilitiesServer::new(self)
    }

    /// The capabilities message.
    pub fn capabilities(&self) -> ServerCapabilities {
        let sha256 = digest_function::Value::Sha256 as i32;
        let functions: Vec<i32> = DigestFunction::ALL
            .into_iter()
            .map(DigestFunction::to_proto)
            .collect();
        let no_priorities = || PriorityCapabilities {
            priorities: vec![PriorityRange {
                min_priority: 0,
                max_priority: 0,
            }],
        };
        let version = |major, minor| SemVer {
            major,
            minor,
            patch: 0,
            prerelease: String::new(),
        };
        ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                digest_functions: functions.clone(),
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                cache_priority_capabilities: Some(no_priorities()),
                max_batch_total_size_bytes: MAX_BATCH_TOTAL_SIZE as i64,
                symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed
                    as i32,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
                max_cas_blob_size_bytes: i64::try_from(self.max_cas_blob_size).unwrap_or(i64::MAX),
                split_blob_support: false,
                splice_blob_support: false,
                fast_cdc_2020_params: None,
                rep_max_cdc_params: None,
            }),
            execution_capabilities: Some(ExecutionCapabilities {
                digest_function: sha256,
                exec_enabled: true,
                execution_priority_capabilities: Some(no_priorities()),
                supported_node_properties: Vec::new(),
                digest_functions: functions,
            }),
            deprecated_api_version: None,
            low_api_version: Some(version(2, 0)),
            high_api_version: Some(version(HIGH_API_VERSION.0, HIGH_API_VERSION.1)),
        }
    }
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        Ok(Response::new(self.capabilities()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_bazel_4_2_3_requires() {
        let caps = CapabilitiesService::new(1 << 30).capabilities();
        let low = caps.low_api_version.unwrap();
        let high = caps.high_api_version.unwrap();
        assert!((low.major, low.minor) <= (2, 0) && (2, 0) <= (high.major, high.minor));
        let exec = caps.execution_capabilities.unwrap();
        assert!(exec.exec_enabled);
        assert_eq!(exec.digest_function, digest_function::Value::Sha256 as i32);
        let cache = caps.cache_capabilities.unwrap();
        assert!(
            cache
                .digest_functions
                .contains(&(digest_function::Value::Sha256 as i32))
        );
        assert!(
            cache
                .action_cache_update_capabilities
                .unwrap()
                .update_enabled
        );
        assert!(cache.max_batch_total_size_bytes > 0);
        assert!(cache.max_batch_total_size_bytes < 4 * 1024 * 1024);
        assert_eq!(cache.max_cas_blob_size_bytes, 1 << 30);
    }
}
