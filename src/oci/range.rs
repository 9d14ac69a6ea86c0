//! The byte-range headers of the distribution spec: `Range` on a blob GET
//! and `Content-Range` on an upload chunk. Pure parsers over the header's
//! text, so what a client sends is checked in one place (and fuzzed).

/// Parse `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` against a blob of
/// `size` bytes. Returns the half-open byte range, or None when the range
/// is malformed, a multi-range, or unsatisfiable (the answer is then 416).
pub fn byte_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().ok()?, size),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.saturating_add(1).min(size)),
    };
    (start < end && start < size).then_some((start, end))
}

/// Parse an upload chunk's `Content-Range: <start>-<end>` (inclusive; the
/// spec's form, with a `bytes ` prefix and a `/<total>` suffix tolerated).
/// None when malformed or when the end is before the start.
pub fn content_range(value: &str) -> Option<(u64, u64)> {
    let s = value.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (b >= a).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(byte_range("bytes=0-9", 100), Some((0, 10)));
        assert_eq!(byte_range("bytes=90-", 100), Some((90, 100)));
        assert_eq!(byte_range("bytes=-10", 100), Some((90, 100)));
        assert_eq!(byte_range("bytes=50-500", 100), Some((50, 100)));
        assert_eq!(byte_range("bytes=100-", 100), None);
        assert_eq!(byte_range("bytes=5-2", 100), None);
        assert_eq!(byte_range("items=0-1", 100), None);
        assert_eq!(byte_range("bytes=0-1,3-4", 100), None);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("0-9"), Some((0, 9)));
        assert_eq!(content_range("bytes 10-19/100"), Some((10, 19)));
        assert_eq!(content_range(" 5 - 5 "), Some((5, 5)));
        assert_eq!(content_range("9-0"), None);
        assert_eq!(content_range("-9"), None);
        assert_eq!(content_range("a-b"), None);
        assert_eq!(content_range("18446744073709551616-1"), None);
    }
}
