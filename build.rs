fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `bytes` fields as `bytes::Bytes`: blob chunks and Raft payloads move
    // between the network and storage without copies.
    tonic_build::configure().bytes(["."]).compile_protos(&["proto/cluster.proto"], &["proto"])?;
    Ok(())
}
