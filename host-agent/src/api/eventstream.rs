//! The AWS event-stream binary framing (`application/vnd.amazon.eventstream`), as
//! `InvokeWithResponseStream` answers with it.
//!
//! One message: a 12-byte prelude (total length, headers length, both u32 big-endian, then
//! the CRC32 of those 8 bytes), the headers, the payload, and the CRC32 of everything before
//! it. A header is a 1-byte name length, the name, a 1-byte value type (7: string), a u16
//! big-endian value length and the value. Lambda's events carry the string headers
//! `:event-type`, `:content-type` and `:message-type` (`event`).

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value};

/// Header value type 7: a UTF-8 string with a u16 length.
const STRING_VALUE: u8 = 7;
/// Prelude (12 bytes) plus the trailing message CRC (4 bytes).
const FRAMING_BYTES: usize = 16;

/// One event message with string headers.
pub fn message(headers: &[(&str, &str)], payload: &[u8]) -> Bytes {
    let headers_len: usize = headers
        .iter()
        .map(|(name, value)| 1 + name.len() + 1 + 2 + value.len())
        .sum();
    let total = FRAMING_BYTES + headers_len + payload.len();
    let mut buf = BytesMut::with_capacity(total);
    // Lengths fit: header names and values are our own short constants, and payloads are
    // chunks of a runtime's body read through hyper (far below 4 GiB).
    buf.put_u32(total as u32);
    buf.put_u32(headers_len as u32);
    let prelude_crc = crc32fast::hash(&buf[..8]);
    buf.put_u32(prelude_crc);
    for (name, value) in headers {
        buf.put_u8(name.len() as u8);
        buf.put_slice(name.as_bytes());
        buf.put_u8(STRING_VALUE);
        buf.put_u16(value.len() as u16);
        buf.put_slice(value.as_bytes());
    }
    buf.put_slice(payload);
    let message_crc = crc32fast::hash(&buf);
    buf.put_u32(message_crc);
    buf.freeze()
}

/// Most bytes of a runtime's body put in one `PayloadChunk` (an event-stream message is at
/// most 16 MiB; smaller events also reach the caller sooner).
pub const MAX_CHUNK: usize = 1024 * 1024;

/// A `PayloadChunk` event: a piece of the function's response.
pub fn payload_chunk(data: &[u8]) -> Bytes {
    message(
        &[
            (":event-type", "PayloadChunk"),
            (":content-type", "application/octet-stream"),
            (":message-type", "event"),
        ],
        data,
    )
}

/// How the invocation ended, for `InvokeComplete`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Completion {
    pub error_code: Option<String>,
    pub error_details: Option<String>,
    /// Base64 of the log's last 4 KB (`X-Amz-Log-Type: Tail`).
    pub log_result: Option<String>,
}

/// The `InvokeComplete` event that ends the stream.
pub fn invoke_complete(c: &Completion) -> Bytes {
    let mut doc = Map::new();
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            doc.insert(k.to_string(), Value::String(v.clone()));
        }
    };
    put("ErrorCode", &c.error_code);
    put("ErrorDetails", &c.error_details);
    put("LogResult", &c.log_result);
    let payload = Value::Object(doc).to_string();
    message(
        &[
            (":event-type", "InvokeComplete"),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event-stream test suite's `empty_message` vector (16 bytes: no headers, no
    /// payload); these bytes also decode with botocore's `EventStreamBuffer`.
    #[test]
    fn empty_message_matches_the_reference_encoding() {
        let m = message(&[], b"");
        assert_eq!(
            &m[..],
            &[
                0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x05, 0xc2, 0x48, 0xeb, 0x7d, 0x98,
                0xc8, 0xff
            ]
        );
    }

    /// The suite's `payload_no_headers` vector: payload `{'foo':'bar'}` (checked the same way).
    #[test]
    fn payload_without_headers_matches_the_reference_encoding() {
        let m = message(&[], b"{'foo':'bar'}");
        assert_eq!(
            &m[..],
            &[
                0x00, 0x00, 0x00, 0x1d, 0x00, 0x00, 0x00, 0x00, 0xfd, 0x52, 0x8c, 0x5a, 0x7b, 0x27,
                0x66, 0x6f, 0x6f, 0x27, 0x3a, 0x27, 0x62, 0x61, 0x72, 0x27, 0x7d, 0xc3, 0x65, 0x39,
                0x36
            ]
        );
    }

    /// Decodes a message the way a client does, checking both CRCs.
    fn decode(m: &[u8]) -> (Vec<(String, String)>, Vec<u8>) {
        let total = u32::from_be_bytes(m[0..4].try_into().unwrap()) as usize;
        let hlen = u32::from_be_bytes(m[4..8].try_into().unwrap()) as usize;
        assert_eq!(total, m.len());
        assert_eq!(
            u32::from_be_bytes(m[8..12].try_into().unwrap()),
            crc32fast::hash(&m[..8])
        );
        assert_eq!(
            u32::from_be_bytes(m[total - 4..].try_into().unwrap()),
            crc32fast::hash(&m[..total - 4])
        );
        let mut headers = Vec::new();
        let mut h = &m[12..12 + hlen];
        while !h.is_empty() {
            let n = h[0] as usize;
            let name = String::from_utf8(h[1..1 + n].to_vec()).unwrap();
            assert_eq!(h[1 + n], STRING_VALUE);
            let vlen = u16::from_be_bytes([h[2 + n], h[3 + n]]) as usize;
            let value = String::from_utf8(h[4 + n..4 + n + vlen].to_vec()).unwrap();
            headers.push((name, value));
            h = &h[4 + n + vlen..];
        }
        (headers, m[12 + hlen..total - 4].to_vec())
    }

    #[test]
    fn payload_chunk_carries_lambdas_headers_and_the_bytes() {
        let (headers, payload) = decode(&payload_chunk(b"hello"));
        assert_eq!(
            headers,
            vec![
                (":event-type".into(), "PayloadChunk".into()),
                (":content-type".into(), "application/octet-stream".into()),
                (":message-type".into(), "event".into()),
            ]
        );
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn invoke_complete_is_json_with_only_the_fields_set() {
        let (headers, payload) = decode(&invoke_complete(&Completion::default()));
        assert_eq!(headers[0].1, "InvokeComplete");
        assert_eq!(payload, b"{}");
        let (_, payload) = decode(&invoke_complete(&Completion {
            error_code: Some("Function.StreamError".into()),
            error_details: Some("boom".into()),
            log_result: None,
        }));
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ErrorCode": "Function.StreamError", "ErrorDetails": "boom"})
        );
    }
}
