//! Generated gRPC code and the conversions between it and openraft types.
//! Raft payloads travel as bincode inside protobuf `bytes`: openraft owns
//! their shape, the proto file owns the transport.

tonic::include_proto!("berth.cluster");

use serde::de::DeserializeOwned;
use serde::Serialize;

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("raft messages encode")
}

pub fn decode<T: DeserializeOwned>(data: &[u8]) -> Result<T, tonic::Status> {
    bincode::deserialize(data).map_err(|e| tonic::Status::invalid_argument(format!("decode: {e}")))
}
