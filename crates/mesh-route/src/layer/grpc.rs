//! The few pieces of the gRPC wire protocol the layer needs: the length-prefixed message
//! framing, the `grpc-timeout` header, and status-only responses.
//!
//! See "gRPC over HTTP2" (`doc/PROTOCOL-HTTP2.md` in grpc/grpc): every message is a 1-byte
//! compressed flag, a 4-byte big-endian length, and the message; `grpc-timeout` is at most
//! eight digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).

use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue};
use tonic::Status;

/// Length of a message's prefix: compressed flag and length.
pub(crate) const PREFIX_LEN: usize = 5;

/// The `grpc-timeout` header.
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The first message of a buffered request body, if it is complete and uncompressed.
///
/// `Err` names what is wrong: the body is empty or cut short, or the message is compressed
/// (the layer does not decompress; such a call is served where it arrived).
pub(crate) fn first_message(body: &Bytes) -> Result<Bytes, &'static str> {
    if body.len() < PREFIX_LEN {
        return Err("the request body holds no complete grpc message");
    }
    let mut prefix = &body[..PREFIX_LEN];
    let compressed = prefix.get_u8();
    let len = prefix.get_u32() as usize;
    if compressed != 0 {
        return Err("the request message is compressed");
    }
    let end = PREFIX_LEN
        .checked_add(len)
        .filter(|&end| end <= body.len())
        .ok_or("the request body holds no complete grpc message")?;
    Ok(body.slice(PREFIX_LEN..end))
}

/// The uncompressed messages among whole, length-prefixed messages (compressed ones are
/// skipped: the layer does not decompress).
pub(crate) fn messages(buf: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        while buf.len().saturating_sub(at) >= PREFIX_LEN {
            let compressed = buf[at] != 0;
            let len =
                u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
            let start = at + PREFIX_LEN;
            let end = start.checked_add(len).filter(|&end| end <= buf.len())?;
            at = end;
            if !compressed {
                return Some(buf.slice(start..end));
            }
        }
        None
    })
}

/// How many leading bytes of `buf` are whole messages.
pub(crate) fn whole_messages_len(buf: &[u8]) -> usize {
    let mut at = 0;
    while buf.len() - at >= PREFIX_LEN {
        let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        match (at + PREFIX_LEN).checked_add(len) {
            Some(end) if end <= buf.len() => at = end,
            _ => break,
        }
    }
    at
}

/// The call's timeout from its `grpc-timeout` header; `None` when absent or malformed (as
/// tonic's own server treats a malformed one).
pub(crate) fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `duration` as a `grpc-timeout` value: the finest unit whose amount fits in eight digits,
/// rounded up so a forwarded deadline is never earlier than the caller's.
pub(crate) fn encode_timeout(duration: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = duration.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let (amount, unit) = units
        .iter()
        .map(|&(per, unit)| (nanos.div_ceil(per), unit))
        .find(|&(amount, _)| amount <= MAX)
        .unwrap_or((MAX, 'H'));
    HeaderValue::from_str(&format!("{amount}{unit}"))
        .unwrap_or_else(|_| HeaderValue::from_static("99999999H"))
}

/// Moves a trailers-only response's status headers into a trailer map (a retried call whose
/// new upstream answers at once with an error continues the client's stream with it).
pub(crate) fn status_trailers(headers: &HeaderMap) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        if let Some(value) = headers.get(name) {
            trailers.insert(name, value.clone());
        }
    }
    trailers
}

/// Whether a response is trailers-only (its status is already in its headers).
pub(crate) fn is_trailers_only(headers: &HeaderMap) -> bool {
    headers.contains_key("grpc-status")
}

/// `status` as trailers ending a relayed stream.
pub(crate) fn trailers_of(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    // Only fails for a status whose details cannot be encoded; then the code alone goes out.
    if status.add_header(&mut trailers).is_err() {
        trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
    }
    trailers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for message in messages {
            out.push(0);
            out.extend_from_slice(&(message.len() as u32).to_be_bytes());
            out.extend_from_slice(message);
        }
        out
    }

    #[test]
    fn the_first_message_is_read_only_when_whole_and_uncompressed() {
        let body = Bytes::from(framed(&[b"hello", b"again"]));
        assert_eq!(first_message(&body).unwrap(), Bytes::from_static(b"hello"));
        let cut = body.slice(..7);
        assert!(first_message(&cut).is_err());
        assert!(first_message(&Bytes::new()).is_err());
        let mut compressed = framed(&[b"x"]);
        compressed[0] = 1;
        assert_eq!(
            first_message(&Bytes::from(compressed)),
            Err("the request message is compressed")
        );
        // An empty message is a valid (default) message.
        assert_eq!(
            first_message(&Bytes::from(framed(&[b""]))).unwrap(),
            Bytes::new()
        );
    }

    #[test]
    fn whole_messages_are_counted_up_to_the_first_partial_one() {
        let two = framed(&[b"abc", b"defgh"]);
        assert_eq!(whole_messages_len(&two), two.len());
        assert_eq!(whole_messages_len(&two[..two.len() - 1]), 8);
        assert_eq!(whole_messages_len(&two[..3]), 0);
        assert_eq!(whole_messages_len(&[]), 0);
        // A length prefix claiming 4 GiB does not overflow.
        assert_eq!(whole_messages_len(&[0, 255, 255, 255, 255, 1]), 0);
    }

    #[test]
    fn whole_messages_are_listed_and_compressed_ones_skipped() {
        let mut bytes = framed(&[b"one", b"", b"three"]);
        let mut compressed = framed(&[b"zip"]);
        compressed[0] = 1;
        bytes.extend_from_slice(&compressed);
        bytes.extend_from_slice(&framed(&[b"four"])[..6]); // cut short
        let bytes = Bytes::from(bytes);
        let listed: Vec<Bytes> = messages(&bytes).collect();
        assert_eq!(listed, [&b"one"[..], b"", b"three"]);
    }

    #[test]
    fn timeouts_round_trip_and_malformed_ones_are_ignored() {
        let mut headers = HeaderMap::new();
        for (value, expected) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
        ] {
            headers.insert(GRPC_TIMEOUT, HeaderValue::from_static(value));
            assert_eq!(timeout(&headers), Some(expected), "{value}");
        }
        for bad in ["", "S", "5", "5s", "-5S", "123456789S", "5 S"] {
            headers.insert(GRPC_TIMEOUT, HeaderValue::from_str(bad).unwrap());
            assert_eq!(timeout(&headers), None, "{bad:?}");
        }
        for duration in [
            Duration::from_nanos(1),
            Duration::from_millis(1500),
            Duration::from_secs(86_400 * 400),
            Duration::from_nanos(123_456_789_123),
        ] {
            headers.insert(GRPC_TIMEOUT, encode_timeout(duration));
            let back = timeout(&headers).unwrap();
            assert!(back >= duration, "{duration:?} became {back:?}");
            assert!(
                back - duration <= duration / 1000 + Duration::from_micros(1),
                "{duration:?} became {back:?}"
            );
        }
    }

    #[test]
    fn statuses_become_trailers() {
        let trailers = trailers_of(&Status::unavailable("peer gone"));
        assert_eq!(trailers.get("grpc-status").unwrap(), "14");
        // Percent-encoded, as the protocol wants.
        assert_eq!(trailers.get("grpc-message").unwrap(), "peer%20gone");
        let moved = status_trailers(&trailers);
        assert_eq!(moved, trailers);
        assert!(is_trailers_only(&trailers));
    }
}
