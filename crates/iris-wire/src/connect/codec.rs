//! Message bodies in the two Connect encodings. JSON goes through the proto descriptors
//! (prost-reflect), so field names, int64-as-string, enums by name and base64 bytes follow
//! the proto3 JSON mapping exactly.

use std::io::Read;
use std::sync::OnceLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};

use crate::proto::FILE_DESCRIPTOR_SET;

/// The body encodings of Connect unary calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `application/proto`: the binary protobuf encoding.
    Proto,
    /// `application/json`: proto3 JSON.
    Json,
}

impl Codec {
    /// The codec of a `Content-Type` (parameters such as `; charset=utf-8` are ignored).
    pub fn from_content_type(ct: &str) -> Option<Codec> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/proto" | "application/x-protobuf" => Some(Codec::Proto),
            "application/json" => Some(Codec::Json),
            _ => None,
        }
    }

    /// The `Content-Type` this codec answers with.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Proto => "application/proto",
            Codec::Json => "application/json",
        }
    }

    /// Decodes `body` as the message `full_name` (e.g. `iris.cluster.Worker.RunTaskRequest`).
    pub fn decode<M: Message + Default>(self, full_name: &str, body: &[u8]) -> Result<M, String> {
        self.decode_in(Generation::January, full_name, body)
    }

    /// [`Codec::decode`] with the descriptors of one wire generation (both name their
    /// messages `iris.cluster.*`, with different shapes).
    pub fn decode_in<M: Message + Default>(
        self,
        generation: Generation,
        full_name: &str,
        body: &[u8],
    ) -> Result<M, String> {
        match self {
            Codec::Proto => M::decode(body).map_err(|e| format!("decoding {full_name}: {e}")),
            Codec::Json => {
                let desc = descriptor(generation, full_name)?;
                let mut de = serde_json::Deserializer::from_slice(body);
                // Fields this proto does not know are skipped, as Iris's clients expect of a
                // peer (protobuf's `ignore_unknown_fields`): a newer sender must not fail here.
                let options = DeserializeOptions::new().deny_unknown_fields(false);
                let dynamic = DynamicMessage::deserialize_with_options(desc, &mut de, &options)
                    .map_err(|e| format!("decoding {full_name} from JSON: {e}"))?;
                M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| format!("decoding {full_name}: {e}"))
            }
        }
    }

    /// Encodes `msg`, whose proto name is `full_name`.
    pub fn encode<M: Message>(self, full_name: &str, msg: &M) -> Result<Vec<u8>, String> {
        self.encode_in(Generation::January, full_name, msg)
    }

    /// [`Codec::encode`] with the descriptors of one wire generation.
    pub fn encode_in<M: Message>(self, generation: Generation, full_name: &str, msg: &M) -> Result<Vec<u8>, String> {
        match self {
            Codec::Proto => Ok(msg.encode_to_vec()),
            Codec::Json => {
                let desc = descriptor(generation, full_name)?;
                let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
                    .map_err(|e| format!("encoding {full_name}: {e}"))?;
                let mut out = Vec::new();
                let mut ser = serde_json::Serializer::new(&mut out);
                dynamic
                    .serialize_with_options(&mut ser, &SerializeOptions::new())
                    .map_err(|e| format!("encoding {full_name} as JSON: {e}"))?;
                Ok(out)
            }
        }
    }
}

/// Which generation of Iris's wire a message belongs to (see docs/ARCHITECTURE.md, "Wire
/// generations"): each has its own descriptor set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// The January-2026 wire (`proto/iris/cluster.proto`).
    January,
    /// The newest Iris wire (`proto/newest/`).
    Newest,
}

fn pool(generation: Generation) -> Result<&'static DescriptorPool, String> {
    static JANUARY: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    static NEWEST: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    let (cell, bytes) = match generation {
        Generation::January => (&JANUARY, FILE_DESCRIPTOR_SET),
        Generation::Newest => (&NEWEST, crate::proto::newest::FILE_DESCRIPTOR_SET),
    };
    cell.get_or_init(|| DescriptorPool::decode(bytes).map_err(|e| format!("loading descriptors: {e}")))
        .as_ref()
        .map_err(Clone::clone)
}

fn descriptor(generation: Generation, full_name: &str) -> Result<MessageDescriptor, String> {
    pool(generation)?.get_message_by_name(full_name).ok_or_else(|| format!("unknown message {full_name}"))
}

/// Inflates a gzip body, refusing more than `limit` bytes of output (a gzip bomb must not
/// take the worker's memory).
pub fn gunzip(body: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("inflating the gzip body: {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!("the request inflates to more than {limit} bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::worker;

    #[test]
    fn json_uses_proto3_names_and_int64_strings() {
        let msg = worker::FetchTaskLogsRequest {
            task_id: "j/task-0".into(),
            filter: Some(worker::FetchLogsFilter { start_line: -5, max_lines: 7, ..Default::default() }),
        };
        let json = Codec::Json.encode("iris.cluster.Worker.FetchTaskLogsRequest", &msg).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["taskId"], "j/task-0");
        assert_eq!(v["filter"]["startLine"], "-5");
        let back: worker::FetchTaskLogsRequest =
            Codec::Json.decode("iris.cluster.Worker.FetchTaskLogsRequest", &json).unwrap();
        assert_eq!(back, msg);
        // Original field names are accepted too.
        let snake: worker::FetchTaskLogsRequest =
            Codec::Json.decode("iris.cluster.Worker.FetchTaskLogsRequest", br#"{"task_id":"x"}"#).unwrap();
        assert_eq!(snake.task_id, "x");
    }

    #[test]
    fn gzip_bombs_are_refused() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; 1 << 20]).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(gunzip(&gz, 2 << 20).unwrap().len(), 1 << 20);
        assert!(gunzip(&gz, 1000).is_err());
    }
}
