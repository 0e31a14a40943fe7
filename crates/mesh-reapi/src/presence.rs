//! `mesh.reapi.v1.Presence`: which blobs this replica holds itself, asked by its peers.
//!
//! The same question as REAPI's `FindMissingBlobs`, in a form made for the volume the owners of
//! a cluster answer it in (every client `FindMissingBlobs` of 10,000 digests becomes one call
//! per owner): digests travel as 40 packed bytes each (hash, then size big-endian) instead of a
//! message with a hexadecimal string apiece, and the answer is one bit per digest. Decoding
//! allocates nothing per digest on either side. A replica of an older release answers
//! `UNIMPLEMENTED`, and the caller falls back to `FindMissingBlobs` (see `peers.rs`).

use mesh_proto::reapi::v1::{
    HasRequest, HasResponse,
    presence_server::{Presence, PresenceServer},
};
use tonic::{Request, Response, Status};

use crate::{Cas, Digest, DigestFunction, HASH_LEN};

/// Bytes per digest on the wire: the hash, then the size as a big-endian `u64`.
pub(crate) const PACKED_DIGEST: usize = HASH_LEN + 8;

/// Packs digests for a [`HasRequest`].
pub(crate) fn pack(digests: &[Digest]) -> Vec<u8> {
    let mut packed = Vec::with_capacity(digests.len() * PACKED_DIGEST);
    for digest in digests {
        packed.extend_from_slice(digest.hash());
        packed.extend_from_slice(&digest.size().to_be_bytes());
    }
    packed
}

/// Unpacks a [`HasRequest`]'s digests of `function`; a length that is not a multiple of 40 is
/// refused.
pub(crate) fn unpack(packed: &[u8], function: DigestFunction) -> Result<Vec<Digest>, String> {
    if !packed.len().is_multiple_of(PACKED_DIGEST) {
        return Err(format!(
            "digests holds {} bytes, not a multiple of {PACKED_DIGEST} (a 32-byte hash and an 8-byte big-endian size per digest)",
            packed.len()
        ));
    }
    Ok(packed
        .chunks_exact(PACKED_DIGEST)
        .map(|chunk| {
            let mut hash = [0u8; HASH_LEN];
            hash.copy_from_slice(&chunk[..HASH_LEN]);
            let mut size = [0u8; 8];
            size.copy_from_slice(&chunk[HASH_LEN..]);
            Digest::with_function(hash, u64::from_be_bytes(size), function)
        })
        .collect())
}

/// Whether bit `i` of a [`HasResponse::present`] bitmap is set.
pub(crate) fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap
        .get(i / 8)
        .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
}

/// The `mesh.reapi.v1.Presence` service over this replica's own CAS.
#[derive(Debug, Clone)]
pub struct PresenceService {
    cas: Cas,
}

impl PresenceService {
    pub(crate) fn new(cas: Cas) -> Self {
        Self { cas }
    }

    /// The tonic service.
    pub fn into_server(self) -> PresenceServer<Self> {
        PresenceServer::new(self)
    }
}

#[tonic::async_trait]
impl Presence for PresenceService {
    async fn has(&self, request: Request<HasRequest>) -> Result<Response<HasResponse>, Status> {
        let request = request.into_inner();
        let function = DigestFunction::from_request(request.digest_function)?;
        let digests = unpack(&request.digests, function).map_err(Status::invalid_argument)?;
        let mut present = vec![0u8; digests.len().div_ceil(8)];
        for (i, here) in self.cas.present(&digests).into_iter().enumerate() {
            if here {
                present[i / 8] |= 1 << (i % 8);
            }
        }
        Ok(Response::new(HasResponse { present }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_pack_and_unpack() {
        let digests = vec![Digest::of(b"a"), Digest::of(b"bb"), Digest::EMPTY];
        let packed = pack(&digests);
        assert_eq!(packed.len(), 3 * PACKED_DIGEST);
        assert_eq!(unpack(&packed, DigestFunction::Sha256).unwrap(), digests);
        let error = unpack(&packed[..41], DigestFunction::Sha256).unwrap_err();
        assert!(
            error.contains("41 bytes") && error.contains("multiple of 40"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn the_answer_has_a_bit_per_digest_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path(), 1 << 20).unwrap();
        let here = cas.put(bytes::Bytes::from_static(b"here")).await.unwrap();
        let absent = Digest::of(b"absent");
        let asked: Vec<Digest> = (0..10)
            .map(|i| if i % 3 == 0 { here } else { absent })
            .collect();
        let response = PresenceService::new(cas)
            .has(Request::new(HasRequest {
                digests: pack(&asked),
                digest_function: 0,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.present.len(), 2);
        for (i, digest) in asked.iter().enumerate() {
            assert_eq!(bit(&response.present, i), *digest == here, "bit {i}");
        }
    }
}
