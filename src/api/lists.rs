//! Listing endpoints: tags (end-8), catalog, referrers (end-12).

use http::{header, StatusCode};
use serde::Serialize;

use super::auth::Principal;
use super::manifests::INDEX;
use super::response::{builder, finish, full, ApiResult};
use super::{AppState, Query};
use crate::meta::Page;
use crate::oci::{Descriptor, Digest, Error, ErrorCode, Name};

/// `n` and `last` of a paginated listing. Every listing is paginated: a
/// missing `n` means `[limits] default_page`, and a larger one than
/// `max_page` is cut to it; the `Link` header leads to the rest.
fn pagination<'q>(state: &AppState, query: &'q Query) -> Result<(Option<usize>, Option<&'q str>), Error> {
    let n = match query.get("n") {
        None | Some("") => state.limits.default_page,
        Some(v) => v.parse::<usize>().map_err(|_| {
            Error::new(ErrorCode::Unsupported, "n must be a non-negative integer").with_status(StatusCode::BAD_REQUEST)
        })?,
    };
    Ok((Some(n.min(state.limits.max_page)), query.get("last").filter(|l| !l.is_empty())))
}

fn page_response<T: Serialize>(body: &T, page: &Page, n: Option<usize>, base: &str) -> ApiResult {
    let json = serde_json::to_vec(body).map_err(super::response::internal)?;
    let mut b = builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, json.len());
    if let (true, Some(n), Some(last)) = (page.more, n, page.items.last()) {
        let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
        b = b.header(header::LINK, format!("<{base}?n={n}&last={last}>; rel=\"next\""));
    }
    finish(b, full(json))
}

pub async fn tags(state: &AppState, name: &Name, query: &Query) -> ApiResult {
    let (n, last) = pagination(state, query)?;
    state.cluster.read_barrier().await?;
    if !state.meta.repo_exists(name)? {
        return Err(Error::new(ErrorCode::NameUnknown, format!("repository {name} is not known")));
    }
    let page = state.meta.tags(name, last, n)?;
    #[derive(Serialize)]
    struct TagList<'a> {
        name: &'a str,
        tags: &'a [String],
    }
    page_response(&TagList { name: name.as_str(), tags: &page.items }, &page, n, &format!("/v2/{name}/tags/list"))
}

/// The repositories the caller may pull from, a page at a time.
pub async fn catalog(state: &AppState, query: &Query, caller: &Principal) -> ApiResult {
    let (n, last) = pagination(state, query)?;
    state.cluster.read_barrier().await?;
    let mut page = state.meta.catalog(last, n)?;
    if state.auth.enabled() {
        // Fill the page from further pages where repositories are hidden.
        let want = n.unwrap_or(usize::MAX);
        let mut kept: Vec<String> = Vec::new();
        loop {
            let scanned_last = page.items.last().cloned();
            kept.extend(page.items.drain(..).filter(|r| state.auth.may_pull(caller, r)));
            if kept.len() >= want || !page.more {
                let more = page.more || kept.len() > want;
                kept.truncate(want);
                page = Page { items: kept, more };
                break;
            }
            page = state.meta.catalog(scanned_last.as_deref(), Some(want - kept.len()))?;
        }
    }
    #[derive(Serialize)]
    struct Catalog<'a> {
        repositories: &'a [String],
    }
    page_response(&Catalog { repositories: &page.items }, &page, n, "/v2/_catalog")
}

/// The referrers index (end-12), paginated like the other listings: `n`
/// descriptors at most (default `[limits] default_page`), `Link` to the
/// next page, which starts after the last digest of this one.
pub async fn referrers(state: &AppState, name: &Name, subject: &Digest, query: &Query) -> ApiResult {
    let (n, last) = pagination(state, query)?;
    let n = n.unwrap_or(state.limits.default_page);
    state.cluster.read_barrier().await?;
    let filter = query.get("artifactType").filter(|f| !f.is_empty());
    let (manifests, more) = state.meta.referrers(name, subject, last, n, filter)?;
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Index<'a> {
        schema_version: u32,
        media_type: &'static str,
        manifests: &'a [Descriptor],
    }
    let json = serde_json::to_vec(&Index { schema_version: 2, media_type: INDEX, manifests: &manifests })
        .map_err(super::response::internal)?;
    let mut b = builder(StatusCode::OK).header(header::CONTENT_TYPE, INDEX).header(header::CONTENT_LENGTH, json.len());
    if filter.is_some() {
        b = b.header("OCI-Filters-Applied", "artifactType");
    }
    if let (true, Some(d)) = (more, manifests.last()) {
        let also: String = filter.map_or(String::new(), |f| {
            format!("&artifactType={}", form_urlencoded::byte_serialize(f.as_bytes()).collect::<String>())
        });
        b = b.header(
            header::LINK,
            format!("</v2/{name}/referrers/{subject}?n={n}&last={}{also}>; rel=\"next\"", d.digest),
        );
    }
    finish(b, full(json))
}
