//! The fleet PKI: the certificate authority, the identities it issues, revocation, and reading
//! who a peer is from the certificate it presented.
//!
//! A fleet has one CA (`ca.pem` + `ca-key.pem` in a CA directory, the key kept offline by the
//! operator). Every seed, node and person gets an *identity* directory: `cert.pem`, `key.pem`,
//! `ca.pem` and, once anything has been revoked, `crl.pem`. A certificate carries:
//!
//! - the identity's name as the subject common name (CN), for logs and the audit trail;
//! - one URI subject-alternative-name `urn:pkgmesh:role:<role>` per role, so roles travel inside
//!   the signed certificate and any peer can read them after the handshake without asking anyone;
//! - the DNS name [`FLEET_DNS_NAME`], which every client asks for: peers are dialled by IP
//!   address and share no DNS names, so the real identity check is "chains to the fleet CA, not
//!   revoked, not expired" plus the role, not the host name;
//! - both TLS server and client usage, since every endpoint both serves and dials.
//!
//! Owns: key and certificate generation (rcgen, ECDSA P-256), the CRL, atomic writing of those
//! files, loading and checking an identity, parsing a peer certificate (x509-parser).
//! Does not own: TLS configuration and the handshake itself (see [`crate::transport`]), deciding
//! what a role may do (each service checks roles on its own requests).

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

/// Prefix of the URI subject-alternative-names that carry roles.
pub const ROLE_URI_PREFIX: &str = "urn:pkgmesh:role:";
/// The DNS name every certificate carries and every client asks for (see the module doc).
pub const FLEET_DNS_NAME: &str = "pkgmesh";
/// Files of a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CRL_FILE: &str = "crl.pem";
/// Files of an identity directory (plus [`CA_CERT_FILE`] and optionally [`CRL_FILE`]).
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// Longest identity or CA name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Lifetime of a fleet CA.
pub const CA_VALID_DAYS: u32 = 3650;
/// Default lifetime of an issued certificate (the CLI's `--days` default).
pub const DEFAULT_VALID_DAYS: u32 = 365;
/// Longest lifetime `issue` accepts.
pub const MAX_VALID_DAYS: u32 = 3650;
/// A CRL's nextUpdate, from its thisUpdate. pkgmesh does not enforce nextUpdate (a CRL stays in
/// force until replaced: an old list of revocations is still true), so this is informational.
const CRL_NEXT_UPDATE_DAYS: i64 = 365;
/// Certificates start this long before "now" so small clock differences across a fleet do not
/// make a fresh certificate "not yet valid" on a peer.
const CLOCK_SKEW: Duration = Duration::minutes(5);
/// Largest PEM file we read: a certificate or CRL is a few KiB; a CRL of 100,000 revocations
/// is a few MiB. Anything bigger is not one of ours.
const MAX_PEM_BYTES: u64 = 16 * 1024 * 1024;

/// What a certificate allows its holder to do. A certificate can carry several roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A seed: clients check it so they know they reached a real seed.
    Seed,
    /// A node: fetches manifests and chunks, announces, serves chunks to other nodes.
    Node,
    /// Publishes, changes defaults and deletes package versions.
    Publisher,
    /// Creates and cancels deployments.
    Deployer,
    /// Reads fleet state: nodes, where a blob is, cache state.
    Operator,
    /// Reads the audit log and anything an operator can.
    Admin,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Seed,
        Role::Node,
        Role::Publisher,
        Role::Deployer,
        Role::Operator,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Seed => "seed",
            Role::Node => "node",
            Role::Publisher => "publisher",
            Role::Deployer => "deployer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The URI subject-alternative-name that carries this role in a certificate.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.as_str())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Role::ALL
            .into_iter()
            .find(|role| role.as_str().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| PkiError::UnknownRole {
                given: s.to_string(),
            })
    }
}

/// Parses `node,publisher` (the CLI's `--role` list): sorted, duplicates removed, never empty.
pub fn parse_roles(list: &str) -> Result<Vec<Role>, PkiError> {
    let mut roles = list
        .split(',')
        .filter(|part| !part.trim().is_empty())
        .map(Role::from_str)
        .collect::<Result<Vec<_>, _>>()?;
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        return Err(PkiError::NoRoles);
    }
    Ok(roles)
}

/// `seed, node, publisher, ...`: for messages that list roles.
pub fn roles_list(roles: &[Role]) -> String {
    if roles.is_empty() {
        return "none".to_string();
    }
    roles
        .iter()
        .map(|role| role.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn valid_roles() -> String {
    roles_list(&Role::ALL)
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("unknown role `{given}`: valid roles are {}", valid_roles())]
    UnknownRole { given: String },
    #[error("no role given: a certificate needs at least one of {}", valid_roles())]
    NoRoles,
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid validity: {reason}")]
    InvalidValidity { reason: String },
    #[error("{} is missing ({what})", path.display())]
    Missing { path: PathBuf, what: &'static str },
    #[error("{} already exists; {hint}", path.display())]
    AlreadyExists { path: PathBuf, hint: &'static str },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a PEM file holding {what}: {reason}", path.display())]
    NotPem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{} holds an unusable certificate: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{} holds an unusable key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("{} holds an unusable revocation list: {reason}", path.display())]
    BadCrl { path: PathBuf, reason: String },
    #[error("{} expired at {not_after}; issue a new certificate with `pkgmesh ca issue`", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("{} is not valid before {not_before}; check this machine's clock", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("{} is not signed by {}: it belongs to another fleet CA", path.display(), ca.display())]
    NotSignedByCa { path: PathBuf, ca: PathBuf },
    #[error("{} does not match {}: the key and certificate are from different identities", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("peer certificate is unusable: {reason}")]
    BadPeerCertificate { reason: String },
    #[error("certificate generation failed: {reason}")]
    Generate { reason: String },
}

fn generate_error(error: rcgen::Error) -> PkiError {
    PkiError::Generate {
        reason: error.to_string(),
    }
}

/// What `init_ca` created.
#[derive(Debug, Clone, Serialize)]
pub struct CaSummary {
    pub dir: PathBuf,
    pub common_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// RFC 3339.
    pub not_after: String,
}

/// What `issue` created.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedSummary {
    pub name: String,
    pub roles: Vec<Role>,
    /// Lowercase hex, as [`PeerIdentity::serial`].
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    pub dir: PathBuf,
    /// Whether the CA's current `crl.pem` was copied into the identity directory.
    pub crl_copied: bool,
}

/// What `revoke` did.
#[derive(Debug, Clone, Serialize)]
pub struct RevokedSummary {
    pub name: String,
    pub serial: String,
    pub crl: PathBuf,
    pub crl_number: u64,
    /// Certificates the CRL now lists.
    pub revoked_count: usize,
    /// The certificate was already on the list; nothing was rewritten.
    pub already_revoked: bool,
}

/// Creates a fleet CA in `dir`: `ca.pem` and `ca-key.pem` (mode 0600), written atomically.
/// Refuses to overwrite an existing CA, whose loss would orphan every certificate of the fleet.
pub fn init_ca(dir: &Path, common_name: &str) -> Result<CaSummary, PkiError> {
    validate_name(common_name)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::AlreadyExists {
                path: path.clone(),
                hint: "a fleet CA is already there; use another --dir or remove it deliberately",
            });
        }
    }
    create_private_dir(dir)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
    let now = whole_seconds(OffsetDateTime::now_utc());
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params.serial_number = Some(random_serial());
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::days(CA_VALID_DAYS.into());
    let cert = params.self_signed(&key).map_err(generate_error)?;

    // Key first: a crash between the two leaves a key without a certificate, which `init_ca`
    // refuses to overwrite, rather than a certificate whose key is lost.
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600, false)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644, false)?;
    tracing::info!(dir = %dir.display(), common_name, "fleet CA created");
    Ok(CaSummary {
        dir: dir.to_path_buf(),
        common_name: common_name.to_string(),
        cert: cert_path,
        key: key_path,
        not_after: rfc3339(params.not_after),
    })
}

/// Issues a certificate valid from now (minus a little clock skew) for `valid_days` days into a
/// new identity directory `out_dir`. See [`issue_with_validity`].
pub fn issue(
    ca_dir: &Path,
    name: &str,
    roles: &[Role],
    valid_days: u32,
    out_dir: &Path,
) -> Result<IssuedSummary, PkiError> {
    if valid_days == 0 || valid_days > MAX_VALID_DAYS {
        return Err(PkiError::InvalidValidity {
            reason: format!("{valid_days} days; choose 1 to {MAX_VALID_DAYS}"),
        });
    }
    let now = OffsetDateTime::now_utc();
    issue_with_validity(
        ca_dir,
        name,
        roles,
        now - CLOCK_SKEW,
        now + Duration::days(valid_days.into()),
        out_dir,
    )
}

/// Issues a certificate with an explicit validity period (tests use one in the past to get an
/// expired certificate). Writes `key.pem` (0600), `cert.pem`, `ca.pem` and, when the CA has
/// revoked anything, its `crl.pem` into `out_dir`. Refuses to overwrite an existing identity.
pub fn issue_with_validity(
    ca_dir: &Path,
    name: &str,
    roles: &[Role],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    out_dir: &Path,
) -> Result<IssuedSummary, PkiError> {
    validate_name(name)?;
    // Certificates hold whole seconds; round here so the summary says what the certificate says.
    let not_before = whole_seconds(not_before);
    let not_after = whole_seconds(not_after);
    let mut roles = roles.to_vec();
    roles.sort();
    roles.dedup();
    if roles.is_empty() {
        return Err(PkiError::NoRoles);
    }
    if not_after <= not_before {
        return Err(PkiError::InvalidValidity {
            reason: format!(
                "not_after {} is not after not_before {}",
                rfc3339(not_after),
                rfc3339(not_before)
            ),
        });
    }
    let ca = FleetCa::load(ca_dir)?;
    if not_after > ca.not_after {
        return Err(PkiError::InvalidValidity {
            reason: format!(
                "the certificate would outlive the fleet CA, which expires at {}; choose fewer days",
                rfc3339(ca.not_after)
            ),
        });
    }
    let cert_path = out_dir.join(CERT_FILE);
    let key_path = out_dir.join(KEY_FILE);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(PkiError::AlreadyExists {
                path: path.clone(),
                hint: "an identity is already there; use another --out",
            });
        }
    }

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
    let serial = random_serial();
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name);
    params.subject_alt_names = subject_alt_names(&roles)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial.clone());
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &ca.issuer).map_err(generate_error)?;

    create_private_dir(out_dir)?;
    write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600, false)?;
    write_atomic(&cert_path, cert.pem().as_bytes(), 0o644, false)?;
    write_atomic(&out_dir.join(CA_CERT_FILE), &ca.cert_pem, 0o644, true)?;
    let crl_source = ca_dir.join(CRL_FILE);
    let crl_copied = match fs::read(&crl_source) {
        Ok(crl) => {
            write_atomic(&out_dir.join(CRL_FILE), &crl, 0o644, true)?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(PkiError::Io {
                action: "read",
                path: crl_source,
                source,
            })
        }
    };
    let serial = serial_hex(serial.as_ref());
    tracing::info!(name, roles = %roles_list(&roles), %serial, out = %out_dir.display(), "certificate issued");
    Ok(IssuedSummary {
        name: name.to_string(),
        roles,
        serial,
        not_before: rfc3339(not_before),
        not_after: rfc3339(not_after),
        dir: out_dir.to_path_buf(),
        crl_copied,
    })
}

/// Adds the certificate in `cert_pem` to the CA's revocation list `ca_dir/crl.pem` (created on
/// first use), keeping what it already lists and bumping the CRL number. Revoking a certificate
/// twice is not an error. Copy the new `crl.pem` into every identity directory (or point the
/// daemons' `--crl` at it) and restart or reload them: revocation is checked at each handshake.
pub fn revoke(ca_dir: &Path, cert_pem: &Path) -> Result<RevokedSummary, PkiError> {
    let ca = FleetCa::load(ca_dir)?;
    let der = read_certificate(cert_pem)?;
    let (_, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| PkiError::BadCertificate {
            path: cert_pem.to_path_buf(),
            reason: e.to_string(),
        })?;
    let ca_cert = ca.parsed()?;
    if cert.verify_signature(Some(ca_cert.public_key())).is_err() {
        return Err(PkiError::NotSignedByCa {
            path: cert_pem.to_path_buf(),
            ca: ca_dir.join(CA_CERT_FILE),
        });
    }
    let description = describe(&cert).map_err(|reason| PkiError::BadCertificate {
        path: cert_pem.to_path_buf(),
        reason,
    })?;
    let serial_bytes = normalized_serial(cert.raw_serial()).to_vec();

    let crl_path = ca_dir.join(CRL_FILE);
    let (mut revoked, previous_number) = match read_optional(&crl_path)? {
        None => (Vec::new(), 0),
        Some(bytes) => existing_crl(&crl_path, &bytes, &ca_cert)?,
    };
    let already_revoked = revoked.iter().any(|entry: &RevokedCertParams| {
        normalized_serial(entry.serial_number.as_ref()) == serial_bytes
    });
    if already_revoked {
        return Ok(RevokedSummary {
            name: description.name,
            serial: description.serial,
            crl: crl_path,
            crl_number: previous_number,
            revoked_count: revoked.len(),
            already_revoked: true,
        });
    }
    let now = OffsetDateTime::now_utc();
    revoked.push(RevokedCertParams {
        serial_number: SerialNumber::from_slice(&serial_bytes),
        revocation_time: now,
        reason_code: None,
        invalidity_date: None,
    });
    let crl_number = previous_number.saturating_add(1);
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CRL_NEXT_UPDATE_DAYS),
        crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer).map_err(generate_error)?;
    let pem = crl.pem().map_err(generate_error)?;
    write_atomic(&crl_path, pem.as_bytes(), 0o644, true)?;
    tracing::info!(name = %description.name, serial = %description.serial, crl_number, "certificate revoked");
    Ok(RevokedSummary {
        name: description.name,
        serial: description.serial,
        crl: crl_path,
        crl_number,
        revoked_count: params.revoked_certs.len(),
        already_revoked: false,
    })
}

/// Reads the entries and the CRL number of the CA's current list, after checking the CA signed it.
fn existing_crl(
    path: &Path,
    pem: &[u8],
    ca_cert: &X509Certificate<'_>,
) -> Result<(Vec<RevokedCertParams>, u64), PkiError> {
    let der = parse_crl_pem(path, pem)?;
    let bad = |reason: String| PkiError::BadCrl {
        path: path.to_path_buf(),
        reason,
    };
    let (_, crl) =
        CertificateRevocationList::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    crl.verify_signature(ca_cert.public_key())
        .map_err(|_| bad("it is not signed by this CA".to_string()))?;
    let number = match crl.crl_number() {
        None => 0,
        Some(n) => {
            let digits = n.to_u64_digits();
            match digits.as_slice() {
                [] => 0,
                [n] => *n,
                _ => return Err(bad("its CRL number does not fit in 64 bits".to_string())),
            }
        }
    };
    let revoked = crl
        .iter_revoked_certificates()
        .map(|entry| RevokedCertParams {
            serial_number: SerialNumber::from_slice(normalized_serial(entry.raw_serial())),
            revocation_time: entry.revocation_date.to_datetime(),
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    Ok((revoked, number))
}

/// Who a peer is, read from the certificate it presented in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerIdentity {
    pub name: String,
    pub roles: Vec<Role>,
    /// The certificate serial, lowercase hex, leading zero bytes removed.
    pub serial: String,
}

impl PeerIdentity {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn has_any_role(&self, roles: &[Role]) -> bool {
        roles.iter().any(|role| self.has_role(*role))
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` (roles: {})", self.name, roles_list(&self.roles))
    }
}

/// Reads name, roles and serial from a DER certificate. Only call this on a certificate the
/// TLS layer has verified: it checks nothing about trust. Unknown role URIs (from a newer CA)
/// are ignored, so an old node still understands the roles it knows.
pub fn peer_identity_from_der(cert: &[u8]) -> Result<PeerIdentity, PkiError> {
    let (_, parsed) =
        X509Certificate::from_der(cert).map_err(|e| PkiError::BadPeerCertificate {
            reason: e.to_string(),
        })?;
    let description =
        describe(&parsed).map_err(|reason| PkiError::BadPeerCertificate { reason })?;
    Ok(PeerIdentity {
        name: description.name,
        roles: description.roles,
        serial: description.serial,
    })
}

struct Description {
    name: String,
    roles: Vec<Role>,
    serial: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

fn describe(cert: &X509Certificate<'_>) -> Result<Description, String> {
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or("it has no common name")?
        .as_str()
        .map_err(|e| format!("its common name is not a string: {e}"))?
        .to_string();
    let mut roles = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("its subject alternative names are malformed: {e}"))?;
    if let Some(san) = san {
        for general_name in &san.value.general_names {
            if let GeneralName::URI(uri) = general_name {
                if let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX) {
                    match Role::from_str(role) {
                        Ok(role) => roles.push(role),
                        Err(_) => tracing::debug!(role, "ignoring a role this build does not know"),
                    }
                }
            }
        }
    }
    roles.sort();
    roles.dedup();
    let validity = cert.validity();
    Ok(Description {
        name,
        roles,
        serial: serial_hex(cert.raw_serial()),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
    })
}

/// An identity: this process's certificate and key, the fleet CA it trusts, and the revocation
/// lists it enforces.
pub struct Identity {
    dir: PathBuf,
    name: String,
    roles: Vec<Role>,
    serial: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    ca: CertificateDer<'static>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            dir: self.dir.clone(),
            name: self.name.clone(),
            roles: self.roles.clone(),
            serial: self.serial.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
            crls: self.crls.clone(),
        }
    }
}

impl fmt::Debug for Identity {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("serial", &self.serial)
            .field("not_after", &rfc3339(self.not_after))
            .field("crls", &self.crls.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads an identity directory: `cert.pem`, `key.pem`, `ca.pem` and, if present, `crl.pem`.
    /// Refuses a certificate that is expired or not yet valid, not signed by `ca.pem`, or whose
    /// key does not match; each error names the file.
    pub fn load(dir: &Path) -> Result<Identity, PkiError> {
        let identity = Self::load_unchecked(dir)?;
        let now = OffsetDateTime::now_utc();
        let cert_path = dir.join(CERT_FILE);
        if now > identity.not_after {
            return Err(PkiError::Expired {
                path: cert_path,
                not_after: rfc3339(identity.not_after),
            });
        }
        if now < identity.not_before {
            return Err(PkiError::NotYetValid {
                path: cert_path,
                not_before: rfc3339(identity.not_before),
            });
        }
        Ok(identity)
    }

    /// Like [`Identity::load`] but accepts a certificate outside its validity period: for
    /// `pkgmesh ca show` on an old identity, and for tests that present an expired certificate.
    /// Signature and key checks still apply.
    pub fn load_unchecked(dir: &Path) -> Result<Identity, PkiError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let ca_path = dir.join(CA_CERT_FILE);
        let cert = read_certificate(&cert_path)?;
        let ca = read_certificate(&ca_path)?;
        let key_pem = read_required(&key_path, "the identity's private key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| PkiError::NotPem {
            path: key_path.clone(),
            what: "a private key",
            reason: e.to_string(),
        })?;

        let (_, ca_parsed) =
            X509Certificate::from_der(ca.as_ref()).map_err(|e| PkiError::BadCertificate {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
        if !ca_parsed.is_ca() {
            return Err(PkiError::BadCertificate {
                path: ca_path,
                reason: "it is not a CA certificate".to_string(),
            });
        }
        let (_, parsed) =
            X509Certificate::from_der(cert.as_ref()).map_err(|e| PkiError::BadCertificate {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        if parsed
            .verify_signature(Some(ca_parsed.public_key()))
            .is_err()
        {
            return Err(PkiError::NotSignedByCa {
                path: cert_path,
                ca: ca_path,
            });
        }
        let description = describe(&parsed).map_err(|reason| PkiError::BadCertificate {
            path: cert_path.clone(),
            reason,
        })?;
        // rustls would find a mismatched key only at the first handshake; say so at load.
        let provider = rustls::crypto::ring::default_provider();
        match rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key.clone_key(), &provider) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(PkiError::KeyMismatch {
                    key: key_path,
                    cert: cert_path,
                })
            }
            Err(e) => {
                return Err(PkiError::BadKey {
                    path: key_path,
                    reason: e.to_string(),
                })
            }
        }

        let mut identity = Identity {
            dir: dir.to_path_buf(),
            name: description.name,
            roles: description.roles,
            serial: description.serial,
            not_before: description.not_before,
            not_after: description.not_after,
            cert,
            key,
            ca,
            crls: Vec::new(),
        };
        let crl_path = dir.join(CRL_FILE);
        if crl_path.exists() {
            identity.load_crl(&crl_path)?;
        }
        Ok(identity)
    }

    /// Adds a revocation list (a `--crl FILE` setting) after checking the fleet CA signed it.
    pub fn load_crl(&mut self, path: &Path) -> Result<(), PkiError> {
        let pem = read_required(path, "a certificate revocation list")?;
        let der = parse_crl_pem(path, &pem)?;
        let bad = |reason: String| PkiError::BadCrl {
            path: path.to_path_buf(),
            reason,
        };
        let (_, ca) =
            X509Certificate::from_der(self.ca.as_ref()).map_err(|e| bad(e.to_string()))?;
        let (_, crl) =
            CertificateRevocationList::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
        crl.verify_signature(ca.public_key())
            .map_err(|_| bad("it is not signed by this identity's fleet CA".to_string()))?;
        if !self.crls.contains(&der) {
            self.crls.push(der);
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn roles(&self) -> &[Role] {
        &self.roles
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Lowercase hex, as [`PeerIdentity::serial`].
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    pub fn is_expired(&self) -> bool {
        OffsetDateTime::now_utc() > self.not_after
    }

    /// This identity as peers see it.
    pub fn peer_identity(&self) -> PeerIdentity {
        PeerIdentity {
            name: self.name.clone(),
            roles: self.roles.clone(),
            serial: self.serial.clone(),
        }
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn key_der(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    pub fn crls(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.crls
    }
}

/// The CA's signing material, loaded for `issue` and `revoke`.
struct FleetCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: Vec<u8>,
    cert_der: CertificateDer<'static>,
    not_after: OffsetDateTime,
}

impl FleetCa {
    fn load(dir: &Path) -> Result<FleetCa, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_required(
            &cert_path,
            "the fleet CA certificate; run `pkgmesh ca init`",
        )?;
        let key_pem = read_required(&key_path, "the fleet CA key; run `pkgmesh ca init`")?;
        let cert_der = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| PkiError::NotPem {
            path: cert_path.clone(),
            what: "a certificate",
            reason: e.to_string(),
        })?;
        let key_text = String::from_utf8(key_pem).map_err(|_| PkiError::NotPem {
            path: key_path.clone(),
            what: "a private key",
            reason: "it is not text".to_string(),
        })?;
        let key = KeyPair::from_pem(&key_text).map_err(|e| PkiError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let (_, parsed) =
            X509Certificate::from_der(cert_der.as_ref()).map_err(|e| PkiError::BadCertificate {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        if !parsed.is_ca() {
            return Err(PkiError::BadCertificate {
                path: cert_path,
                reason: "it is not a CA certificate".to_string(),
            });
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch {
                key: key_path,
                cert: cert_path,
            });
        }
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| PkiError::BadCertificate {
                path: cert_path,
                reason: e.to_string(),
            })?;
        Ok(FleetCa {
            issuer,
            cert_pem,
            cert_der,
            not_after,
        })
    }

    fn parsed(&self) -> Result<X509Certificate<'_>, PkiError> {
        X509Certificate::from_der(self.cert_der.as_ref())
            .map(|(_, cert)| cert)
            .map_err(|e| PkiError::BadCertificate {
                path: PathBuf::from(CA_CERT_FILE),
                reason: e.to_string(),
            })
    }
}

fn validate_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason: &str| PkiError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.trim().is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid("it is longer than 128 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("it contains control characters"));
    }
    if name.trim() != name {
        return Err(invalid("it starts or ends with white space"));
    }
    Ok(())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn subject_alt_names(roles: &[Role]) -> Result<Vec<SanType>, PkiError> {
    let ia5 = |text: String| {
        Ia5String::try_from(text).map_err(|e| PkiError::Generate {
            reason: e.to_string(),
        })
    };
    let mut names = vec![SanType::DnsName(ia5(FLEET_DNS_NAME.to_string())?)];
    for role in roles {
        names.push(SanType::URI(ia5(role.uri())?));
    }
    Ok(names)
}

/// 16 random bytes, top bit clear so the DER integer is positive without a padding byte and
/// the hex form is the same in the certificate, the CRL and our summaries.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn normalized_serial(raw: &[u8]) -> &[u8] {
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    &raw[first..]
}

fn serial_hex(raw: &[u8]) -> String {
    hex::encode(normalized_serial(raw))
}

fn whole_seconds(time: OffsetDateTime) -> OffsetDateTime {
    time - Duration::nanoseconds(time.nanosecond().into())
}

/// RFC 3339 text; falls back to the Unix time for dates RFC 3339 cannot express.
pub fn rfc3339(time: OffsetDateTime) -> String {
    time.format(&Rfc3339)
        .unwrap_or_else(|_| time.unix_timestamp().to_string())
}

fn read_required(path: &Path, what: &'static str) -> Result<Vec<u8>, PkiError> {
    read_optional(path)?.ok_or_else(|| PkiError::Missing {
        path: path.to_path_buf(),
        what,
    })
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PkiError> {
    let io = |source| PkiError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    };
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    use std::io::Read;
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(PkiError::NotPem {
            path: path.to_path_buf(),
            what: "a certificate, key or revocation list",
            reason: format!("it is larger than {MAX_PEM_BYTES} bytes"),
        });
    }
    Ok(Some(bytes))
}

fn read_certificate(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let what = if path.file_name().is_some_and(|n| n == CA_CERT_FILE) {
        "the fleet CA certificate"
    } else {
        "a certificate"
    };
    let pem = read_required(path, what)?;
    CertificateDer::from_pem_slice(&pem).map_err(|e| PkiError::NotPem {
        path: path.to_path_buf(),
        what: "a certificate",
        reason: e.to_string(),
    })
}

fn parse_crl_pem(
    path: &Path,
    pem: &[u8],
) -> Result<CertificateRevocationListDer<'static>, PkiError> {
    CertificateRevocationListDer::from_pem_slice(pem).map_err(|e| PkiError::NotPem {
        path: path.to_path_buf(),
        what: "an X509 CRL",
        reason: e.to_string(),
    })
}

/// Creates `dir` (mode 0700 when we create it: it will hold private keys).
fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| PkiError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, created with
/// `mode` (so a key is never readable by others, not even for an instant), fsynced, then
/// renamed over `path` (or hard-linked when `overwrite` is false, which fails if `path` exists,
/// with no window between the check and the write), then the directory fsynced.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32, overwrite: bool) -> Result<(), PkiError> {
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io {
            action,
            path,
            source,
        }
    };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        ".{file_name}.tmp.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut file = options.open(&temp).map_err(io("create", &temp))?;
        file.write_all(bytes).map_err(io("write", &temp))?;
        file.sync_all().map_err(io("sync", &temp))?;
        drop(file);
        if overwrite {
            fs::rename(&temp, path).map_err(io("rename into", path))?;
        } else {
            match fs::hard_link(&temp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(PkiError::AlreadyExists {
                        path: path.to_path_buf(),
                        hint: "refusing to overwrite it",
                    })
                }
                // Some file systems have no hard links; fall back to check-then-rename.
                Err(_) if !path.exists() => {
                    fs::rename(&temp, path).map_err(io("rename into", path))?;
                }
                Err(e) => return Err(io("link", path)(e)),
            }
            let _ = fs::remove_file(&temp);
        }
        // The rename is durable only once the directory entry is on disk.
        if let Ok(dir_handle) = fs::File::open(&dir) {
            let _ = dir_handle.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_display_and_serialize_in_lowercase() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
            assert_eq!(
                serde_json::to_string(&role).unwrap(),
                format!("\"{}\"", role.as_str())
            );
        }
        assert_eq!("Publisher".parse::<Role>().unwrap(), Role::Publisher);
        let error = "root".parse::<Role>().unwrap_err().to_string();
        assert!(error.contains("root"), "{error}");
        assert!(
            error.contains("seed, node, publisher, deployer, operator, admin"),
            "{error}"
        );
        assert_eq!(
            parse_roles("publisher,node,publisher").unwrap(),
            vec![Role::Node, Role::Publisher]
        );
        assert!(matches!(parse_roles(" , "), Err(PkiError::NoRoles)));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("node-17.eu-west-1").is_ok());
        assert!(validate_name("Zoë's laptop").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a\nb").is_err());
        assert!(validate_name("a\u{7f}b").is_err());
        assert!(validate_name(" padded").is_err());
        assert!(validate_name(&"x".repeat(128)).is_ok());
        assert!(validate_name(&"x".repeat(129)).is_err());
    }

    #[test]
    fn issued_identity_round_trips_name_roles_and_serial() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir, "test fleet").unwrap();
        let issued = issue(
            &ca_dir,
            "deploy-bot",
            &[Role::Publisher, Role::Deployer, Role::Publisher],
            30,
            &dir.path().join("id"),
        )
        .unwrap();
        assert_eq!(issued.roles, vec![Role::Publisher, Role::Deployer]);
        let identity = Identity::load(&dir.path().join("id")).unwrap();
        assert_eq!(identity.name(), "deploy-bot");
        assert_eq!(identity.roles(), &[Role::Publisher, Role::Deployer]);
        assert_eq!(identity.serial(), issued.serial);
        let peer = peer_identity_from_der(identity.cert_der()).unwrap();
        assert_eq!(peer, identity.peer_identity());
        assert_eq!(peer.serial.len(), 32);
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_private_and_a_ca_is_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir, "fleet").unwrap();
        let mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let before = fs::read(ca_dir.join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            init_ca(&ca_dir, "fleet"),
            Err(PkiError::AlreadyExists { .. })
        ));
        assert_eq!(fs::read(ca_dir.join(CA_KEY_FILE)).unwrap(), before);

        let id = dir.path().join("id");
        issue(&ca_dir, "n1", &[Role::Node], 1, &id).unwrap();
        let mode = fs::metadata(id.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            issue(&ca_dir, "n1", &[Role::Node], 1, &id),
            Err(PkiError::AlreadyExists { .. })
        ));
        let leftovers: Vec<_> = fs::read_dir(&id)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn load_names_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir, "fleet").unwrap();
        let id = dir.path().join("id");
        issue(&ca_dir, "n1", &[Role::Node], 1, &id).unwrap();

        // Missing key.
        let key = fs::read(id.join(KEY_FILE)).unwrap();
        fs::remove_file(id.join(KEY_FILE)).unwrap();
        let error = Identity::load(&id).unwrap_err().to_string();
        assert!(
            error.contains("key.pem") && error.contains("missing"),
            "{error}"
        );
        fs::write(id.join(KEY_FILE), &key).unwrap();

        // Not PEM.
        let cert = fs::read(id.join(CERT_FILE)).unwrap();
        fs::write(id.join(CERT_FILE), b"hello").unwrap();
        let error = Identity::load(&id).unwrap_err().to_string();
        assert!(
            error.contains("cert.pem") && error.contains("not a PEM"),
            "{error}"
        );
        fs::write(id.join(CERT_FILE), &cert).unwrap();

        // Another CA.
        let other = dir.path().join("other");
        init_ca(&other, "other fleet").unwrap();
        fs::copy(other.join(CA_CERT_FILE), id.join(CA_CERT_FILE)).unwrap();
        let error = Identity::load(&id).unwrap_err();
        assert!(matches!(error, PkiError::NotSignedByCa { .. }), "{error}");
        fs::copy(ca_dir.join(CA_CERT_FILE), id.join(CA_CERT_FILE)).unwrap();

        // Another identity's key.
        let id2 = dir.path().join("id2");
        issue(&ca_dir, "n2", &[Role::Node], 1, &id2).unwrap();
        fs::copy(id2.join(KEY_FILE), id.join(KEY_FILE)).unwrap();
        let error = Identity::load(&id).unwrap_err();
        assert!(matches!(error, PkiError::KeyMismatch { .. }), "{error}");
    }

    #[test]
    fn an_expired_certificate_is_refused_at_load_but_readable_unchecked() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir, "fleet").unwrap();
        let id = dir.path().join("id");
        let now = OffsetDateTime::now_utc();
        issue_with_validity(
            &ca_dir,
            "old",
            &[Role::Node],
            now - Duration::days(10),
            now - Duration::days(1),
            &id,
        )
        .unwrap();
        let error = Identity::load(&id).unwrap_err();
        assert!(matches!(error, PkiError::Expired { .. }), "{error}");
        assert!(error.to_string().contains("cert.pem"));
        let identity = Identity::load_unchecked(&id).unwrap();
        assert!(identity.is_expired());
    }

    #[test]
    fn revoke_keeps_the_list_and_bumps_the_number() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir, "fleet").unwrap();
        for name in ["a", "b"] {
            issue(&ca_dir, name, &[Role::Node], 1, &dir.path().join(name)).unwrap();
        }
        let first = revoke(&ca_dir, &dir.path().join("a").join(CERT_FILE)).unwrap();
        assert_eq!((first.crl_number, first.revoked_count), (1, 1));
        let second = revoke(&ca_dir, &dir.path().join("b").join(CERT_FILE)).unwrap();
        assert_eq!((second.crl_number, second.revoked_count), (2, 2));
        let again = revoke(&ca_dir, &dir.path().join("a").join(CERT_FILE)).unwrap();
        assert!(again.already_revoked);
        assert_eq!((again.crl_number, again.revoked_count), (2, 2));

        // The list parses, is signed by the CA and names both serials.
        let pem = fs::read(ca_dir.join(CRL_FILE)).unwrap();
        let der = CertificateRevocationListDer::from_pem_slice(&pem).unwrap();
        let (_, crl) = CertificateRevocationList::from_der(der.as_ref()).unwrap();
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|e| serial_hex(e.raw_serial()))
            .collect();
        assert_eq!(serials, vec![first.serial, second.serial]);

        // A certificate of another CA cannot be revoked here.
        let other = dir.path().join("other");
        init_ca(&other, "other").unwrap();
        issue(&other, "x", &[Role::Node], 1, &dir.path().join("x")).unwrap();
        assert!(matches!(
            revoke(&ca_dir, &dir.path().join("x").join(CERT_FILE)),
            Err(PkiError::NotSignedByCa { .. })
        ));

        // An identity issued after a revocation gets the CRL and loads it.
        let issued = issue(&ca_dir, "c", &[Role::Node], 1, &dir.path().join("c")).unwrap();
        assert!(issued.crl_copied);
        assert_eq!(
            Identity::load(&dir.path().join("c")).unwrap().crls().len(),
            1
        );
    }
}
