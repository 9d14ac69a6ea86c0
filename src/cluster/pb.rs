//! Generated gRPC code and the conversions between it and openraft types.
//! Raft payloads travel inside protobuf `bytes` in berth's versioned
//! encoding ([`crate::codec`]): openraft owns their shape, the proto file
//! owns the transport.

tonic::include_proto!("berth.cluster");

use serde::de::DeserializeOwned;
use serde::Serialize;

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    crate::codec::encode(v)
}

pub fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, tonic::Status> {
    crate::codec::decode(data).map_err(|e| tonic::Status::invalid_argument(format!("decode: {e}")))
}
