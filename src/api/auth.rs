//! Who is calling and what they may do. A request's credentials become a
//! [`Principal`] (anonymous, an htpasswd user, or the holder of a token from
//! a trusted token service); the endpoint says what it [`Needs`]; [`Auth`]
//! answers yes, 401 with the challenge that tells the client how to
//! authenticate, or 403 DENIED for a known caller without the right. Every
//! node reads the same rules from its config, so every node gives the same
//! answer; the decision needs nothing but the request and the config.
//!
//! Secrets never reach a log: credentials are parsed here and only names
//! leave this module. Passwords are compared by bcrypt on a blocking thread,
//! at most [`BCRYPT_AT_ONCE`] at a time, and a verified (or refused)
//! password is remembered by its SHA-256 for a while, so a pull storm costs
//! one bcrypt per user, not one per request.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http::HeaderMap;
use regex::Regex;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use super::tls::{file_stamp, FileStamp};
use crate::config::{AccessRule, AuthSettings, TokenSettings};
use crate::oci::{Error, ErrorCode, Name};

/// bcrypt comparisons running at once; more wait their turn.
pub const BCRYPT_AT_ONCE: usize = 2;
/// How long a password check's answer is remembered.
const REMEMBER: Duration = Duration::from_secs(300);
/// Answers remembered at most; the memory is emptied when full.
const REMEMBER_MOST: usize = 10_000;
/// Clock skew allowed on a token's times.
const LEEWAY_SECS: u64 = 30;

/// What a caller may be allowed to do in a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pull,
    Push,
    Delete,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }
}

/// What an endpoint needs of its caller.
#[derive(Debug, Clone)]
pub enum Needs {
    /// Nothing (metrics, health).
    Nothing,
    /// Only that the caller authenticated (`GET /v2/`, `docker login`).
    Login,
    /// The catalog: answered for anyone authenticated, filtered by pull.
    Catalog,
    /// These actions on these repositories, all of them.
    Repo(Vec<(Name, Action)>),
}

/// Who the caller is.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No credentials (or auth is off).
    Anonymous,
    /// An htpasswd user.
    User(String),
    /// The holder of a verified token: its subject and what it grants.
    Token { subject: String, access: Vec<TokenAccess> },
}

impl Principal {
    /// The name open upload sessions are counted under, when there is one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Principal::Anonymous => None,
            Principal::User(u) => Some(u),
            Principal::Token { subject, .. } => Some(subject),
        }
    }
}

/// One entry of a token's `access` claim.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenAccess {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    access: Vec<TokenAccess>,
}

/// Someone a rule may name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    Anyone,
    Authenticated,
    Group(String),
    User(String),
}

impl Who {
    fn parse(s: &str, groups: &BTreeMap<String, Vec<String>>) -> Result<Who, String> {
        Ok(match s {
            "anonymous" => Who::Anyone,
            "authenticated" => Who::Authenticated,
            g if g.starts_with("group:") => {
                let name = &g["group:".len()..];
                if !groups.contains_key(name) {
                    return Err(format!("{s} is not defined in [auth.groups]"));
                }
                Who::Group(name.to_owned())
            }
            u if valid_user(u) => Who::User(u.to_owned()),
            other => return Err(format!("{other:?} is not a user, group:<name>, authenticated or anonymous")),
        })
    }
}

fn valid_user(u: &str) -> bool {
    !u.is_empty() && u.len() <= 256 && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@+".contains(&b))
}

/// A compiled access rule.
#[derive(Debug)]
struct Rule {
    repos: Regex,
    pull: Vec<Who>,
    push: Vec<Who>,
    delete: Vec<Who>,
}

/// A repository pattern as a regex: `**` any characters, `*` any within
/// one path component, `?` one character other than `/`.
pub(crate) fn pattern(p: &str) -> Result<Regex, String> {
    if p.is_empty() {
        return Err("an empty pattern".into());
    }
    let mut re = String::from("^");
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                re.push_str(".*");
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| e.to_string())
}

/// The rules and who is in which group.
#[derive(Debug)]
pub struct Access {
    rules: Vec<Rule>,
    groups: BTreeMap<String, Vec<String>>,
}

impl Access {
    /// Check `[auth]` and `[[access]]`, naming the key at fault.
    pub fn validate(auth: Option<&AuthSettings>, rules: &[AccessRule]) -> Result<(), String> {
        match auth {
            None if !rules.is_empty() => Err("[[access]] rules need an [auth] table (who the users are)".into()),
            None => Ok(()),
            Some(a) => {
                if a.htpasswd.is_none() && a.token.is_none() {
                    return Err("[auth] needs htpasswd, [auth.token] or both".into());
                }
                if let Some(t) = &a.token {
                    if t.public_keys.is_empty() {
                        return Err("auth.token.public_keys must name at least one key file".into());
                    }
                    for (k, v) in [("realm", &t.realm), ("service", &t.service), ("issuer", &t.issuer)] {
                        if v.is_empty() || v.contains('"') {
                            return Err(format!("auth.token.{k} must be non-empty, without quotes"));
                        }
                    }
                }
                if a.realm.contains('"') {
                    return Err("auth.realm must not contain quotes".into());
                }
                for (g, users) in &a.groups {
                    if let Some(u) = users.iter().find(|u| !valid_user(u)) {
                        return Err(format!("auth.groups.{g}: {u:?} is not a valid user name"));
                    }
                }
                Access::compile(a, rules).map(|_| ())
            }
        }
    }

    fn compile(auth: &AuthSettings, rules: &[AccessRule]) -> Result<Access, String> {
        let mut out = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let who = |key: &str, list: &[String]| -> Result<Vec<Who>, String> {
                list.iter()
                    .map(|s| Who::parse(s, &auth.groups).map_err(|e| format!("access[{i}].{key}: {e}")))
                    .collect()
            };
            out.push(Rule {
                repos: pattern(&r.repos).map_err(|e| format!("access[{i}].repos: {e}"))?,
                pull: who("pull", &r.pull)?,
                push: who("push", &r.push)?,
                delete: who("delete", &r.delete)?,
            });
        }
        Ok(Access { rules: out, groups: auth.groups.clone() })
    }

    fn admits(&self, who: &Who, caller: &Principal) -> bool {
        let user = match caller {
            Principal::User(u) => Some(u.as_str()),
            _ => None,
        };
        match who {
            Who::Anyone => true,
            Who::Authenticated => user.is_some(),
            Who::User(u) => user == Some(u.as_str()),
            Who::Group(g) => user.is_some_and(|u| self.groups.get(g).is_some_and(|m| m.iter().any(|x| x == u))),
        }
    }

    /// Whether the rules let `caller` (anonymous or an htpasswd user) do
    /// `action` in `repo`.
    fn allows(&self, caller: &Principal, repo: &Name, action: Action) -> bool {
        if self.rules.is_empty() {
            return matches!(caller, Principal::User(_));
        }
        let Some(rule) = self.rules.iter().find(|r| r.repos.is_match(repo.as_str())) else { return false };
        let list = match action {
            Action::Pull => &rule.pull,
            Action::Push => &rule.push,
            Action::Delete => &rule.delete,
        };
        list.iter().any(|w| self.admits(w, caller))
    }
}

/// The users of an htpasswd file.
#[derive(Debug)]
struct Htpasswd {
    path: PathBuf,
    users: Mutex<(HashMap<String, String>, FileStamp)>,
}

/// Parse htpasswd text: `user:hash` lines, bcrypt hashes only (as
/// Distribution). A line that is not one names its number.
pub fn parse_htpasswd(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("line {}: not user:hash", i + 1));
        };
        if !valid_user(user) {
            return Err(format!("line {}: {user:?} is not a valid user name", i + 1));
        }
        if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) || bcrypt::HashParts::from_str(hash).is_err() {
            return Err(format!("line {}: user {user}: only bcrypt hashes are supported (htpasswd -B)", i + 1));
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

impl Htpasswd {
    fn load(path: &Path) -> Result<Htpasswd, String> {
        let st = file_stamp(path);
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let users = parse_htpasswd(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Htpasswd { path: path.to_owned(), users: Mutex::new((users, st)) })
    }

    /// Read the file again if it changed. Returns whether it did.
    fn reload_if_changed(&self) -> bool {
        let now = file_stamp(&self.path);
        if self.users.lock().unwrap().1 == now {
            return false;
        }
        let read = std::fs::read_to_string(&self.path).map_err(|e| e.to_string()).and_then(|t| parse_htpasswd(&t));
        let mut users = self.users.lock().unwrap();
        users.1 = now;
        match read {
            Ok(u) => {
                tracing::info!(file = %self.path.display(), users = u.len(), "htpasswd reloaded");
                users.0 = u;
                true
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "htpasswd not reloaded; keeping the users read before");
                false
            }
        }
    }

    fn hash_of(&self, user: &str) -> Option<String> {
        self.users.lock().unwrap().0.get(user).cloned()
    }
}

/// Remembered answers of password checks: user → (SHA-256 of the password,
/// whether it was right, when).
#[derive(Default)]
struct Remembered(HashMap<String, Vec<([u8; 32], bool, Instant)>>, usize);

impl Remembered {
    fn get(&self, user: &str, pw: &[u8; 32]) -> Option<bool> {
        let entries = self.0.get(user)?;
        entries.iter().find(|(h, _, at)| bool::from(h.ct_eq(pw)) && at.elapsed() < REMEMBER).map(|(_, ok, _)| *ok)
    }

    fn put(&mut self, user: &str, pw: [u8; 32], ok: bool) {
        if self.1 >= REMEMBER_MOST {
            self.0.clear();
            self.1 = 0;
        }
        let list = self.0.entry(user.to_owned()).or_default();
        list.retain(|(_, _, at)| at.elapsed() < REMEMBER);
        list.push((pw, ok, Instant::now()));
        self.1 += 1;
    }
}

/// Verifies tokens from the configured token service.
struct Tokens {
    settings: TokenSettings,
    keys: Vec<(jsonwebtoken::DecodingKey, jsonwebtoken::Validation)>,
}

impl Tokens {
    fn load(t: &TokenSettings) -> Result<Tokens, String> {
        use jsonwebtoken::{Algorithm, DecodingKey, Validation};
        let mut keys = Vec::new();
        for p in &t.public_keys {
            let pem = std::fs::read(p).map_err(|e| format!("auth.token.public_keys: {}: {e}", p.display()))?;
            let (key, algs) = if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (k, vec![Algorithm::ES256, Algorithm::ES384])
            } else if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (
                    k,
                    vec![
                        Algorithm::RS256,
                        Algorithm::RS384,
                        Algorithm::RS512,
                        Algorithm::PS256,
                        Algorithm::PS384,
                        Algorithm::PS512,
                    ],
                )
            } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
                (k, vec![Algorithm::EdDSA])
            } else {
                return Err(format!(
                    "auth.token.public_keys: {}: not a PEM public key (EC, RSA or Ed25519)",
                    p.display()
                ));
            };
            for alg in algs {
                let mut v = Validation::new(alg);
                v.set_audience(&[&t.service]);
                v.set_issuer(&[&t.issuer]);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                v.leeway = LEEWAY_SECS;
                v.validate_nbf = true;
                keys.push((key.clone(), v));
            }
        }
        Ok(Tokens { settings: t.clone(), keys })
    }

    /// The token's claims if one of the keys verifies it and its times,
    /// issuer and audience hold.
    fn verify(&self, token: &str) -> Option<Claims> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        self.keys
            .iter()
            .filter(|(_, v)| v.algorithms.contains(&header.alg))
            .find_map(|(k, v)| jsonwebtoken::decode::<Claims>(token, k, v).ok())
            .map(|d| d.claims)
    }

    fn challenge(&self, needs: &Needs, error: Option<&str>) -> String {
        let t = &self.settings;
        let mut c = format!("Bearer realm=\"{}\",service=\"{}\"", t.realm, t.service);
        let scope = match needs {
            Needs::Repo(list) => {
                let mut by_repo: Vec<(String, Vec<&str>)> = Vec::new();
                for (repo, a) in list {
                    match by_repo.iter_mut().find(|(r, _)| r == repo.as_str()) {
                        Some((_, acts)) => acts.push(a.as_str()),
                        None => by_repo.push((repo.as_str().to_owned(), vec![a.as_str()])),
                    }
                }
                by_repo
                    .iter()
                    .map(|(r, acts)| format!("repository:{r}:{}", acts.join(",")))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
            Needs::Catalog => "registry:catalog:*".into(),
            _ => String::new(),
        };
        if !scope.is_empty() {
            c.push_str(&format!(",scope=\"{scope}\""));
        }
        if let Some(e) = error {
            c.push_str(&format!(",error=\"{e}\""));
        }
        c
    }
}

/// Token verification as a client's bearer token reaches it, for the fuzz
/// targets (fuzz/), which have no running node.
#[cfg(fuzzing)]
pub struct TokenVerifier(Tokens);

#[cfg(fuzzing)]
impl TokenVerifier {
    pub fn new(settings: &TokenSettings) -> Result<TokenVerifier, String> {
        Tokens::load(settings).map(TokenVerifier)
    }

    /// Whether `token` verifies and grants `action` on repository `repo`.
    pub fn grants(&self, token: &str, repo: &str, action: &str) -> bool {
        self.0.verify(token).is_some_and(|c| grants(&c.access, "repository", repo, action))
    }
}

fn grants(access: &[TokenAccess], kind: &str, name: &str, action: &str) -> bool {
    access.iter().any(|a| a.kind == kind && a.name == name && a.actions.iter().any(|x| x == action || x == "*"))
}

/// The API's authentication and authorization. Cheap to clone.
#[derive(Clone)]
pub struct Auth(Option<Arc<Enabled>>);

struct Enabled {
    realm: String,
    htpasswd: Option<Htpasswd>,
    tokens: Option<Tokens>,
    access: Access,
    remembered: Mutex<Remembered>,
    bcrypt: Semaphore,
}

/// Credentials a request carries.
enum Credentials {
    None,
    Basic { user: String, password: String },
    Bearer(String),
    Malformed,
}

fn credentials(headers: &HeaderMap) -> Credentials {
    let Some(v) = headers.get(http::header::AUTHORIZATION) else { return Credentials::None };
    let Ok(v) = v.to_str() else { return Credentials::Malformed };
    let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok();
        let text = decoded.and_then(|d| String::from_utf8(d).ok());
        match text.as_deref().and_then(|t| t.split_once(':')) {
            // containers/image (skopeo, podman, buildah) answers a Basic
            // challenge with an empty user and password when it has none:
            // that is the anonymous caller, who may still pull what the
            // rules open to anyone.
            Some(("", "")) => Credentials::None,
            Some((u, p)) => Credentials::Basic { user: u.to_owned(), password: p.to_owned() },
            None => Credentials::Malformed,
        }
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Credentials::Bearer(rest.trim().to_owned())
    } else {
        Credentials::Malformed
    }
}

impl Auth {
    /// No authentication: everyone may do everything.
    pub fn open() -> Auth {
        Auth(None)
    }

    /// From the config (already validated).
    pub fn load(auth: Option<&AuthSettings>, rules: &[AccessRule]) -> Result<Auth, String> {
        let Some(a) = auth else {
            tracing::warn!("no [auth]: anyone who reaches the API may pull, push and delete");
            return Ok(Auth::open());
        };
        Ok(Auth(Some(Arc::new(Enabled {
            realm: a.realm.clone(),
            htpasswd: a
                .htpasswd
                .as_deref()
                .map(Htpasswd::load)
                .transpose()
                .map_err(|e| format!("auth.htpasswd: {e}"))?,
            tokens: a.token.as_ref().map(Tokens::load).transpose()?,
            access: Access::compile(a, rules)?,
            remembered: Mutex::new(Remembered::default()),
            bcrypt: Semaphore::new(BCRYPT_AT_ONCE),
        }))))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Re-read the htpasswd file when it changes, until `shutdown` fires.
    pub async fn watch(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let Some(e) = self.0 else { return };
        if e.htpasswd.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(super::tls::RELOAD_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            let e2 = e.clone();
            let changed =
                tokio::task::spawn_blocking(move || e2.htpasswd.as_ref().is_some_and(|h| h.reload_if_changed()))
                    .await
                    .unwrap_or(false);
            if changed {
                *e.remembered.lock().unwrap() = Remembered::default();
            }
        }
    }

    /// Who the caller is and whether they may do what `needs` says.
    pub async fn authorize(&self, headers: &HeaderMap, needs: &Needs) -> Result<Principal, Error> {
        let Some(e) = &self.0 else { return Ok(Principal::Anonymous) };
        if matches!(needs, Needs::Nothing) {
            return Ok(Principal::Anonymous);
        }
        let caller = e.identify(headers, needs).await?;
        let refused = |known: bool| -> Error {
            if known && !matches!(caller, Principal::Token { .. }) {
                Error::new(ErrorCode::Denied, "requested access to the resource is denied")
            } else {
                let error = matches!(caller, Principal::Token { .. }).then_some("insufficient_scope");
                Error::unauthorized("authentication required", e.challenge(needs, error))
            }
        };
        let known = !matches!(caller, Principal::Anonymous);
        match needs {
            Needs::Nothing => Ok(caller),
            Needs::Login | Needs::Catalog if known => Ok(caller),
            Needs::Login | Needs::Catalog => Err(refused(false)),
            Needs::Repo(list) => {
                if list.iter().all(|(repo, action)| e.allows(&caller, repo, *action)) {
                    Ok(caller)
                } else {
                    Err(refused(known))
                }
            }
        }
    }

    /// Whether `caller` may pull from `repo` (catalog filtering).
    pub fn may_pull(&self, caller: &Principal, repo: &str) -> bool {
        let Some(e) = &self.0 else { return true };
        if let Principal::Token { access, .. } = caller {
            if grants(access, "registry", "catalog", "*") {
                return true;
            }
        }
        repo.parse::<Name>().is_ok_and(|n| e.allows(caller, &n, Action::Pull))
    }

    /// Whether a cross-repository mount may look for the blob in every
    /// repository (no `from`): only on an open registry, where nothing is
    /// private.
    pub fn mount_anywhere(&self) -> bool {
        self.0.is_none()
    }
}

impl Enabled {
    fn challenge(&self, needs: &Needs, error: Option<&str>) -> String {
        match &self.tokens {
            Some(t) => t.challenge(needs, error),
            None => format!("Basic realm=\"{}\"", self.realm),
        }
    }

    fn allows(&self, caller: &Principal, repo: &Name, action: Action) -> bool {
        match caller {
            Principal::Token { access, .. } => grants(access, "repository", repo.as_str(), action.as_str()),
            // Anonymous callers get what rules give `anonymous`.
            _ => self.access.allows(caller, repo, action),
        }
    }

    async fn identify(&self, headers: &HeaderMap, needs: &Needs) -> Result<Principal, Error> {
        let bad = |what: &str, error: Option<&str>| Error::unauthorized(what.to_owned(), self.challenge(needs, error));
        match credentials(headers) {
            Credentials::None => Ok(Principal::Anonymous),
            Credentials::Malformed => Err(bad("malformed Authorization header", None)),
            Credentials::Bearer(token) => {
                let Some(tokens) = &self.tokens else {
                    return Err(bad("bearer tokens are not accepted here", None));
                };
                match tokens.verify(&token) {
                    Some(c) => Ok(Principal::Token { subject: c.sub, access: c.access }),
                    None => Err(bad("invalid, expired or foreign token", Some("invalid_token"))),
                }
            }
            Credentials::Basic { user, password } => {
                if self.check_password(&user, &password).await {
                    Ok(Principal::User(user))
                } else {
                    Err(bad("invalid username or password", None))
                }
            }
        }
    }

    /// Whether `password` is `user`'s, remembered or by bcrypt. An unknown
    /// user costs a bcrypt too, so timing does not tell who exists.
    async fn check_password(&self, user: &str, password: &str) -> bool {
        let Some(h) = &self.htpasswd else { return false };
        let pw: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        if let Some(ok) = self.remembered.lock().unwrap().get(user, &pw) {
            return ok;
        }
        let Ok(_permit) = self.bcrypt.acquire().await else { return false };
        // Another request may have checked the same pair while this waited.
        if let Some(ok) = self.remembered.lock().unwrap().get(user, &pw) {
            return ok;
        }
        let known = h.hash_of(user);
        let (password, hash) = (password.to_owned(), known.clone().unwrap_or_else(|| DUMMY_HASH.clone()));
        let verified = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        let ok = verified && known.is_some();
        self.remembered.lock().unwrap().put(user, pw, ok);
        ok
    }
}

/// A bcrypt hash of a random password, at the default cost: checked for
/// unknown users so they cost what known ones do.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    bcrypt::hash(format!("{:032x}", rand::random::<u128>()), bcrypt::DEFAULT_COST).expect("bcrypt hashes")
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_within_and_across_components() {
        let p = pattern("team-a/**").unwrap();
        assert!(p.is_match("team-a/x") && p.is_match("team-a/x/y"));
        assert!(!p.is_match("team-ab/x") && !p.is_match("team-a"));
        let p = pattern("*/base").unwrap();
        assert!(p.is_match("lib/base") && !p.is_match("a/b/base"));
        assert!(pattern("**").unwrap().is_match("any/thing/at/all"));
        assert!(pattern("a.b").unwrap().is_match("a.b") && !pattern("a.b").unwrap().is_match("axb"));
    }

    #[test]
    fn htpasswd_takes_bcrypt_only_and_names_the_line() {
        let h = bcrypt::hash("pw", 4).unwrap();
        let users = parse_htpasswd(&format!("# users\nalice:{h}\n\n")).unwrap();
        assert_eq!(users.len(), 1);
        let e = parse_htpasswd(&format!("alice:{h}\nbob:{{SHA}}abc\n")).unwrap_err();
        assert!(e.contains("line 2") && e.contains("bcrypt"), "{e}");
        assert!(parse_htpasswd("no-colon\n").unwrap_err().contains("line 1"));
    }

    #[test]
    fn rules_are_validated_with_the_key_named() {
        let auth = AuthSettings { htpasswd: Some("/x".into()), ..Default::default() };
        let rule = |pull: &[&str]| AccessRule {
            repos: "a/**".into(),
            pull: pull.iter().map(|s| s.to_string()).collect(),
            push: vec![],
            delete: vec![],
        };
        let e = Access::validate(Some(&auth), &[rule(&["alice"]), rule(&["group:ops"])]).unwrap_err();
        assert!(e.starts_with("access[1].pull") && e.contains("group:ops"), "{e}");
        assert!(Access::validate(None, &[rule(&["alice"])]).unwrap_err().contains("[auth]"));
        assert!(Access::validate(Some(&auth), &[rule(&["anonymous", "authenticated", "bob"])]).is_ok());
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let mut auth = AuthSettings { htpasswd: Some("/x".into()), ..Default::default() };
        auth.groups.insert("dev".into(), vec!["bob".into()]);
        let rules = vec![
            AccessRule {
                repos: "team-a/**".into(),
                pull: vec!["group:dev".into(), "anonymous".into()],
                push: vec!["alice".into()],
                delete: vec![],
            },
            AccessRule { repos: "**".into(), pull: vec!["authenticated".into()], push: vec![], delete: vec![] },
        ];
        let a = Access::compile(&auth, &rules).unwrap();
        let (alice, bob, anon) = (Principal::User("alice".into()), Principal::User("bob".into()), Principal::Anonymous);
        let repo = |s: &str| s.parse::<Name>().unwrap();
        assert!(a.allows(&anon, &repo("team-a/app"), Action::Pull));
        assert!(a.allows(&alice, &repo("team-a/app"), Action::Push));
        assert!(!a.allows(&bob, &repo("team-a/app"), Action::Push));
        assert!(!a.allows(&alice, &repo("team-a/app"), Action::Delete));
        assert!(a.allows(&bob, &repo("other/app"), Action::Pull));
        assert!(!a.allows(&anon, &repo("other/app"), Action::Pull));
    }
}
