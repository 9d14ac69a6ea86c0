//! Manifest parsing: which media types berth stores, how a manifest names the
//! content it depends on, and how it describes itself to the referrers API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Digest, Error, ErrorCode};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifest media types berth accepts on PUT. Docker schema1 is long retired.
pub const SUPPORTED: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// An OCI content descriptor. Unknown fields are ignored, as the spec requires.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// What berth needs to know about a manifest: its type, what it depends on,
/// and what it says about itself for the referrers API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    /// For referrers: the manifest's artifactType, else its config media type.
    pub artifact_type: Option<String>,
    /// Blobs that must exist in the repository (config and layers), excluding
    /// non-distributable layers, which live elsewhere by definition.
    pub blobs: Vec<Digest>,
    /// Child manifests that must exist in the repository (index entries).
    pub children: Vec<Digest>,
    pub subject: Option<Digest>,
    pub annotations: Option<BTreeMap<String, String>>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorCode::ManifestInvalid, msg)
}

fn is_nondistributable(d: &Descriptor) -> bool {
    d.media_type.contains("nondistributable") || d.media_type.contains(".foreign.")
}

impl Manifest {
    /// Parse and validate manifest bytes sent with `content_type` (the
    /// request's Content-Type, if any).
    pub fn parse(content_type: Option<&str>, bytes: &[u8]) -> Result<Manifest, Error> {
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| invalid(format!("manifest is not valid: {e}")))?;
        if raw.schema_version.as_ref().and_then(|v| v.as_i64()) != Some(2) {
            return Err(invalid("schemaVersion must be 2"));
        }
        let content_type = content_type.map(|c| c.split(';').next().unwrap_or("").trim()).filter(|c| !c.is_empty());
        let media_type = match (content_type, raw.media_type.as_deref()) {
            (Some(ct), Some(mt)) if ct != mt => {
                return Err(invalid(format!("Content-Type {ct} does not match mediaType {mt}")))
            }
            (Some(ct), _) => ct.to_owned(),
            (None, Some(mt)) => mt.to_owned(),
            (None, None) if raw.manifests.is_some() => OCI_INDEX.to_owned(),
            (None, None) => OCI_MANIFEST.to_owned(),
        };
        let is_index = match media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => false,
            OCI_INDEX | DOCKER_LIST => true,
            other => return Err(invalid(format!("unsupported manifest media type {other:?}"))),
        };
        let mut blobs = Vec::new();
        let mut children = Vec::new();
        let artifact_type;
        if is_index {
            if raw.config.is_some() || raw.layers.is_some() {
                return Err(invalid("an index has no config or layers"));
            }
            let manifests = raw.manifests.ok_or_else(|| invalid("index without manifests"))?;
            children.extend(manifests.into_iter().map(|d| d.digest));
            artifact_type = raw.artifact_type;
        } else {
            if raw.manifests.is_some() {
                return Err(invalid("an image manifest has no manifests list"));
            }
            let config = raw.config.ok_or_else(|| invalid("image manifest without config"))?;
            let layers = raw.layers.ok_or_else(|| invalid("image manifest without layers"))?;
            artifact_type = raw.artifact_type.or_else(|| Some(config.media_type.clone()));
            blobs.push(config.digest);
            blobs.extend(layers.into_iter().filter(|l| !is_nondistributable(l)).map(|l| l.digest));
        }
        Ok(Manifest {
            media_type,
            artifact_type,
            blobs,
            children,
            subject: raw.subject.map(|s| s.digest),
            annotations: raw.annotations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_manifest_refs() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/x","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":3}},
                      {{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar","digest":"{}","size":3}}],
            "subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":9}}}}"#,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let m = Manifest::parse(Some(OCI_MANIFEST), body.as_bytes()).unwrap();
        assert_eq!(m.blobs.len(), 2);
        assert_eq!(m.artifact_type.as_deref(), Some("application/x"));
        assert_eq!(m.subject.unwrap().to_string(), d('e'));
    }

    #[test]
    fn rejects_garbage_and_mismatch() {
        assert!(Manifest::parse(None, b"not json").is_err());
        assert!(Manifest::parse(None, br#"{"schemaVersion":1}"#).is_err());
        let idx = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(Manifest::parse(Some(OCI_MANIFEST), idx.as_bytes()).is_err());
        assert!(Manifest::parse(Some(OCI_INDEX), idx.as_bytes()).is_ok());
        assert!(Manifest::parse(Some("text/plain"), br#"{"schemaVersion":2,"manifests":[]}"#).is_err());
    }
}
