//! Authentication and authorization on a TLS node: every endpoint, every
//! role. Without credentials a refused request gets 401 with the challenge
//! that says how to authenticate; a known user without the right gets 403
//! DENIED; a refused request stores and reveals nothing. Token auth with
//! test-signed JWTs: valid, expired, wrong audience and wrong scope. A
//! certificate replaced on disk is served without a restart.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use reqwest::{Client, Method, StatusCode};

struct Node {
    _p: Proc,
    base: String,
    dir: tempfile::TempDir,
    ca: std::path::PathBuf,
}

async fn tls_node(auth: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = api_certs(&dir.path().join("tls"));
    let (http, grpc) = (free_port(), free_port());
    let rest = format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n{auth}\n", cert.display(), key.display());
    let args = write_config(&dir.path().join("berth.toml"), 1, http, grpc, &dir.path().join("data"), &rest);
    let p = spawn_serve_tls(&args, http, &ca).await;
    Node { _p: p, base: format!("https://localhost:{http}"), dir, ca }
}

/// Start `berth serve` and wait until its API answers over TLS.
async fn spawn_serve_tls(args: &[String], http: u16, ca: &Path) -> Proc {
    let child = berth()
        .arg("serve")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start berth");
    let proc = Proc(child, None);
    let c = tls_client(ca);
    let url = format!("https://localhost:{http}/v2/");
    wait_for("node to answer over TLS", Duration::from_secs(60), || {
        let (c, url) = (c.clone(), url.clone());
        async move { c.get(&url).send().await.is_ok() }
    })
    .await;
    proc
}

fn htpasswd(dir: &Path, users: &[(&str, &str)]) -> std::path::PathBuf {
    let text: String = users.iter().map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap())).collect();
    let path = dir.join("htpasswd");
    std::fs::write(&path, text).unwrap();
    path
}

const USERS: &[(&str, &str)] = &[("alice", "alice-pw"), ("bob", "bob-pw"), ("admin", "admin-pw"), ("eve", "eve-pw")];

fn rules(htpasswd: &Path) -> String {
    format!(
        r#"[auth]
htpasswd = "{}"
[auth.groups]
dev = ["bob"]

[[access]]
repos = "public/**"
pull = ["anonymous"]
push = ["alice", "eve"]
delete = ["admin"]

[[access]]
repos = "team-a/**"
pull = ["group:dev", "alice", "admin"]
push = ["alice"]
delete = ["admin"]
"#,
        htpasswd.display()
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum As {
    Anonymous,
    Alice,
    Bob,
    Admin,
    Eve,
    WrongPassword,
    /// Basic with an empty user and password: what containers/image sends
    /// when it has no credentials. It is the anonymous caller.
    EmptyBasic,
}

fn with(req: reqwest::RequestBuilder, who: As) -> reqwest::RequestBuilder {
    match who {
        As::Anonymous => req,
        As::Alice => req.basic_auth("alice", Some("alice-pw")),
        As::Bob => req.basic_auth("bob", Some("bob-pw")),
        As::Admin => req.basic_auth("admin", Some("admin-pw")),
        As::Eve => req.basic_auth("eve", Some("eve-pw")),
        As::WrongPassword => req.basic_auth("alice", Some("not-alice-pw")),
        As::EmptyBasic => req.basic_auth("", Some("")),
    }
}

/// Push an image to `repo` as alice: returns (manifest digest, layer digest).
async fn seed(c: &Client, base: &str, repo: &str) -> (String, String) {
    let layer = format!("layer of {repo}").into_bytes();
    let config = format!("{{\"repo\":\"{repo}\"}}").into_bytes();
    let mut digests = Vec::new();
    for data in [&layer, &config] {
        let d = sha256(data);
        let r = with(c.post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}")), As::Alice)
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "seed blob");
        digests.push(d);
    }
    let m = image_manifest((&digests[1], config.len()), &[(&digests[0], layer.len())], "");
    let r = with(c.put(format!("{base}/v2/{repo}/manifests/v1")), As::Alice)
        .header("Content-Type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "seed manifest");
    (sha256(&m), digests[0].clone())
}

#[tokio::test]
async fn every_endpoint_refuses_whom_the_rules_refuse_and_reveals_nothing() {
    let pre = tempfile::tempdir().unwrap();
    let h = htpasswd(pre.path(), USERS);
    let node = tls_node(&rules(&h)).await;
    let (c, b) = (tls_client(&node.ca), node.base.clone());
    let (m_a, l_a) = seed(&c, &b, "team-a/app").await;
    let (_m_p, l_p) = seed(&c, &b, "public/base").await;

    // (method, path, body, who may) for every endpoint; the decision for
    // each role follows from the rules above.
    use As::*;
    let new_blob = b"a new blob".to_vec();
    let nd = sha256(&new_blob);
    let manifest = image_manifest((&l_a, "layer of team-a/app".len()), &[], "");
    let cases: Vec<(Method, String, Vec<u8>, Vec<As>)> = vec![
        (Method::GET, "/v2/".into(), vec![], vec![Alice, Bob, Admin, Eve]),
        (Method::GET, "/v2/team-a/app/tags/list".into(), vec![], vec![Alice, Bob, Admin]),
        (Method::GET, format!("/v2/team-a/app/manifests/{m_a}"), vec![], vec![Alice, Bob, Admin]),
        (Method::HEAD, "/v2/team-a/app/manifests/v1".into(), vec![], vec![Alice, Bob, Admin]),
        (Method::GET, format!("/v2/team-a/app/blobs/{l_a}"), vec![], vec![Alice, Bob, Admin]),
        (Method::HEAD, format!("/v2/team-a/app/blobs/{l_a}"), vec![], vec![Alice, Bob, Admin]),
        (Method::GET, format!("/v2/team-a/app/referrers/{m_a}"), vec![], vec![Alice, Bob, Admin]),
        (Method::GET, "/v2/public/base/manifests/v1".into(), vec![], vec![Anonymous, Alice, Bob, Admin, Eve]),
        (Method::GET, format!("/v2/public/base/blobs/{l_p}"), vec![], vec![Anonymous, Alice, Bob, Admin, Eve]),
        (Method::POST, format!("/v2/team-a/app/blobs/uploads/?digest={nd}"), new_blob.clone(), vec![Alice]),
        (Method::POST, "/v2/team-a/other/blobs/uploads/".into(), vec![], vec![Alice]),
        (Method::PUT, "/v2/team-a/app/manifests/v2".into(), manifest.clone(), vec![Alice]),
        // A mount from a repository the caller cannot read is refused even
        // with push on the target (eve may push to public/**).
        (Method::POST, format!("/v2/public/x/blobs/uploads/?mount={l_a}&from=team-a/app"), vec![], vec![Alice]),
        (Method::DELETE, "/v2/team-a/app/manifests/v1".into(), vec![], vec![Admin]),
        (Method::DELETE, format!("/v2/team-a/app/blobs/{l_a}"), vec![], vec![Admin]),
    ];
    for (method, path, body, allowed) in &cases {
        for who in [Anonymous, EmptyBasic, Eve, Bob, WrongPassword] {
            if allowed.contains(&who) || (who == EmptyBasic && allowed.contains(&Anonymous)) {
                continue;
            }
            let before = files_under(&node.dir.path().join("data"));
            let tags_before = with(c.get(format!("{b}/v2/team-a/app/tags/list")), Alice).send().await.unwrap();
            let tags_before = tags_before.text().await.unwrap();
            let mut req = with(c.request(method.clone(), format!("{b}{path}")), who);
            if path.contains("manifests/v2") {
                req = req.header("Content-Type", OCI_MANIFEST);
            }
            let r = req.body(body.clone()).send().await.unwrap();
            let status = r.status();
            let challenge = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_string());
            let text = r.text().await.unwrap();
            let known = matches!(who, Eve | Bob);
            if known {
                assert_eq!(status, StatusCode::FORBIDDEN, "{who:?} {method} {path}: {text}");
                if *method != Method::HEAD {
                    assert!(text.contains("DENIED"), "{who:?} {method} {path}: {text}");
                }
            } else {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{who:?} {method} {path}: {text}");
                assert_eq!(challenge.as_deref(), Some("Basic realm=\"berth\""), "{who:?} {method} {path}");
                if *method != Method::HEAD {
                    assert!(text.contains("UNAUTHORIZED"), "{who:?} {method} {path}: {text}");
                }
            }
            // Nothing revealed: the refusal does not depend on whether the
            // thing exists, and carries none of it.
            assert!(!text.contains("layer of"), "{text}");
            // Nothing stored: no upload session, no blob, no tag.
            let after = files_under(&node.dir.path().join("data"));
            let new_files: Vec<_> = after
                .iter()
                .filter(|f| !before.contains(f) && (f.contains("uploads/") || f.contains("blobs/")))
                .collect();
            assert!(new_files.is_empty(), "{who:?} {method} {path} stored {new_files:?}");
            let tags_after = with(c.get(format!("{b}/v2/team-a/app/tags/list")), Alice).send().await.unwrap();
            assert_eq!(tags_after.text().await.unwrap(), tags_before, "{who:?} {method} {path} changed the tags");
        }
    }
    // The allowed side of each case (deletes last, they change the state).
    for (method, path, body, allowed) in &cases {
        let who = allowed[0];
        let mut req = with(c.request(method.clone(), format!("{b}{path}")), who);
        if path.contains("manifests/v2") {
            req = req.header("Content-Type", OCI_MANIFEST);
        }
        let r = req.body(body.clone()).send().await.unwrap();
        assert!(r.status().is_success(), "{who:?} {method} {path}: {} {:?}", r.status(), r.text().await);
    }
    // An empty Basic user may read what anyone may.
    let r = with(c.get(format!("{b}/v2/public/base/manifests/v1")), EmptyBasic).send().await.unwrap();
    assert_eq!(r.status(), 200, "an empty Basic user is the anonymous caller");

    // The catalog lists only what the caller may pull.
    let list = |who| {
        let c = c.clone();
        let b = b.clone();
        async move {
            let v: serde_json::Value =
                with(c.get(format!("{b}/v2/_catalog")), who).send().await.unwrap().json().await.unwrap();
            v["repositories"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect::<Vec<_>>()
        }
    };
    let eve = list(Eve).await;
    assert!(eve.iter().all(|r| r.starts_with("public/")), "{eve:?}");
    assert!(list(Alice).await.contains(&"team-a/app".to_string()));
    let anon = with(c.get(format!("{b}/v2/_catalog")), Anonymous).send().await.unwrap();
    assert_eq!(anon.status(), 401);
}

#[tokio::test]
async fn without_rules_any_htpasswd_user_may_do_everything_and_anonymous_nothing() {
    let pre = tempfile::tempdir().unwrap();
    let h = htpasswd(pre.path(), &[("carol", "carol-pw")]);
    let node = tls_node(&format!("[auth]\nhtpasswd = \"{}\"\n", h.display())).await;
    let c = tls_client(&node.ca);
    let b = &node.base;
    let d = sha256(b"x");
    let r = c.post(format!("{b}/v2/any/repo/blobs/uploads/?digest={d}")).body("x").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(format!("{b}/v2/any/repo/blobs/uploads/?digest={d}"))
        .basic_auth("carol", Some("carol-pw"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A changed htpasswd file is read again: a new user can log in.
    let h2 = htpasswd(pre.path(), &[("carol", "carol-pw"), ("dave", "dave-pw")]);
    assert_eq!(h, h2);
    wait_for("the new user to be accepted", Duration::from_secs(30), || {
        let c = c.clone();
        let url = format!("{b}/v2/");
        async move { c.get(url).basic_auth("dave", Some("dave-pw")).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(key: &rcgen::KeyPair, aud: &str, exp: u64, access: serde_json::Value) -> String {
    let claims = serde_json::json!({
        "iss": "test-issuer", "sub": "ci-bot", "aud": aud,
        "exp": exp, "nbf": now() - 10, "iat": now() - 10, "jti": format!("{}", rand_id()),
        "access": access,
    });
    let k = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &claims, &k).unwrap()
}

fn rand_id() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

#[tokio::test]
async fn tokens_from_the_trusted_service_are_honoured_and_bad_ones_refused() {
    let pre = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::KeyPair::generate().unwrap();
    let pubkey = pre.path().join("token.pem");
    std::fs::write(&pubkey, key.public_key_pem()).unwrap();
    let node = tls_node(&format!(
        "[auth]\n[auth.token]\nrealm = \"https://auth.example/token\"\nservice = \"berth-test\"\n\
         issuer = \"test-issuer\"\npublic_keys = [\"{}\"]\n",
        pubkey.display()
    ))
    .await;
    let c = tls_client(&node.ca);
    let b = &node.base;
    let push = serde_json::json!([{"type": "repository", "name": "ci/app", "actions": ["pull", "push"]}]);
    let pull = serde_json::json!([{"type": "repository", "name": "ci/app", "actions": ["pull"]}]);
    let d = sha256(b"token blob");
    let upload = |t: Option<String>| {
        let c = c.clone();
        let url = format!("{b}/v2/ci/app/blobs/uploads/?digest={d}");
        async move {
            let mut r = c.post(url).body("token blob");
            if let Some(t) = t {
                r = r.bearer_auth(t);
            }
            r.send().await.unwrap()
        }
    };
    // No token: the challenge names the realm, service and scope.
    let r = upload(None).await;
    assert_eq!(r.status(), 401);
    let ch = r.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(
        ch.starts_with("Bearer realm=\"https://auth.example/token\",service=\"berth-test\"")
            && ch.contains("scope=\"repository:ci/app:push\""),
        "{ch}"
    );
    // Refused: expired, wrong audience, signed by another key, wrong scope.
    for (what, t) in [
        ("expired", token(&key, "berth-test", now() - 120, push.clone())),
        ("wrong audience", token(&key, "another-registry", now() + 300, push.clone())),
        ("foreign key", token(&other, "berth-test", now() + 300, push.clone())),
        ("pull-only scope", token(&key, "berth-test", now() + 300, pull.clone())),
    ] {
        let r = upload(Some(t)).await;
        assert_eq!(r.status(), 401, "{what}");
        let ch = r.headers()["www-authenticate"].to_str().unwrap().to_string();
        let want = if what == "pull-only scope" { "insufficient_scope" } else { "invalid_token" };
        assert!(ch.contains(want), "{what}: {ch}");
    }
    // Honoured: a valid token with push.
    let r = upload(Some(token(&key, "berth-test", now() + 300, push.clone()))).await;
    assert_eq!(r.status(), 201);
    // And its pull-only sibling reads, but only its own repository.
    let t = token(&key, "berth-test", now() + 300, pull.clone());
    let r = c.get(format!("{b}/v2/ci/app/blobs/{d}")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(format!("{b}/v2/ci/other/blobs/{d}")).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_a_restart() {
    let node = tls_node("").await;
    let old = tls_client(&node.ca);
    assert_eq!(old.get(format!("{}/v2/", node.base)).send().await.unwrap().status(), 200);
    // A new CA and certificate replace the files in place.
    let fresh = tempfile::tempdir().unwrap();
    let (new_ca, new_cert, new_key) = api_certs(fresh.path());
    let tls = node.dir.path().join("tls");
    std::fs::copy(&new_key, tls.join(".k")).unwrap();
    std::fs::copy(&new_cert, tls.join(".c")).unwrap();
    std::fs::rename(tls.join(".k"), tls.join("api.key")).unwrap();
    std::fs::rename(tls.join(".c"), tls.join("api.pem")).unwrap();
    let new = tls_client(&new_ca);
    let url = format!("{}/v2/", node.base);
    wait_for("the new certificate to be served", Duration::from_secs(30), || {
        let (c, url) = (new.clone(), url.clone());
        async move { c.get(url).send().await.is_ok() }
    })
    .await;
    // Clients that trust only the old CA are now refused (new connections).
    let old = tls_client(&node.ca);
    assert!(old.get(url).send().await.is_err());
    // HTTP/2 is offered over TLS.
    let r = new.get(format!("{}/v2/", node.base)).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
}

/// Load balancers health-check `/v2/` without credentials: a serving node
/// with users answers 401 (healthy to `berth ping` and the bundled
/// haproxy), and one that is not serving answers 503 before asking who
/// calls, so a draining node still looks down.
#[tokio::test]
async fn health_checks_tell_serving_from_not_serving_without_credentials() {
    let pre = tempfile::tempdir().unwrap();
    let h = htpasswd(pre.path(), &[("carol", "carol-pw")]);
    let auth = format!("[auth]\nhtpasswd = \"{}\"\n", h.display());
    let start = |extra: String| async move {
        let dir = tempfile::tempdir().unwrap();
        let (http, grpc) = (free_port(), free_port());
        let args = write_config(&dir.path().join("berth.toml"), 1, http, grpc, &dir.path().join("data"), &extra);
        (spawn_serve(&args, http).await, http, dir)
    };
    let (_serving, http, _d1) = start(auth.clone()).await;
    let r = client().get(format!("http://127.0.0.1:{http}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let ping = berth().args(["ping", "--http", &format!("127.0.0.1:{http}")]).output().unwrap();
    assert!(ping.status.success(), "berth ping: {}", String::from_utf8_lossy(&ping.stderr));

    // On standby (no cluster yet), the node does not serve.
    let (_standby, http, _d2) = start(format!("standby = true\n{auth}")).await;
    let r = client().get(format!("http://127.0.0.1:{http}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 503, "not serving is said before credentials are asked for");
    let ping = berth().args(["ping", "--http", &format!("127.0.0.1:{http}")]).output().unwrap();
    assert!(!ping.status.success());
}
