//! `pkgmesh ca init|issue|revoke|show`: the fleet CA and the identities it issues. The rules
//! (key types, what a certificate carries, the CRL) live in `pkgmesh_node::pki`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use pkgmesh_node::pki::{self, Identity, Role};
use serde::Serialize;

use crate::output::print_json;

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a fleet CA (ca.pem, and ca-key.pem readable only by you) in a new directory.
    Init(InitArgs),
    /// Issue a certificate and key for a seed, a node or a person into an identity directory.
    Issue(IssueArgs),
    /// Add a certificate to the CA's revocation list (crl.pem in the CA directory).
    Revoke(RevokeArgs),
    /// Print an identity's name, roles, serial and validity.
    Show(ShowArgs),
}

#[derive(Args)]
pub struct InitArgs {
    /// The CA directory to create; keep it offline, it holds the fleet's signing key.
    #[arg(long, value_name = "CADIR")]
    dir: PathBuf,
    /// The CA's common name.
    #[arg(long, default_value = "pkgmesh fleet CA")]
    name: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct IssueArgs {
    /// The CA directory (from `pkgmesh ca init`).
    #[arg(long, value_name = "CADIR")]
    dir: PathBuf,
    /// The identity's name, shown in logs and the audit log (up to 128 characters).
    #[arg(long)]
    name: String,
    /// Roles, comma-separated or repeated: seed, node, publisher, deployer, operator, admin.
    #[arg(long = "role", value_name = "ROLE[,ROLE...]", value_delimiter = ',', required = true, value_parser = parse_role)]
    roles: Vec<Role>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = pki::DEFAULT_VALID_DAYS)]
    days: u32,
    /// The identity directory to write (cert.pem, key.pem, ca.pem, and crl.pem if any).
    #[arg(long, value_name = "IDDIR")]
    out: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RevokeArgs {
    /// The CA directory that issued the certificate.
    #[arg(long, value_name = "CADIR")]
    dir: PathBuf,
    /// The certificate to revoke (an identity's cert.pem).
    #[arg(long, value_name = "PATH")]
    cert: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ShowArgs {
    /// The identity directory.
    #[arg(long, value_name = "IDDIR", env = "PKGMESH_IDENTITY")]
    identity: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_role(text: &str) -> Result<Role, String> {
    text.parse::<Role>().map_err(|e| e.to_string())
}

pub fn run(command: CaCommand) -> anyhow::Result<ExitCode> {
    match command {
        CaCommand::Init(args) => init(args),
        CaCommand::Issue(args) => issue(args),
        CaCommand::Revoke(args) => revoke(args),
        CaCommand::Show(args) => show(args),
    }
}

fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    let summary = pki::init_ca(&args.dir, &args.name).context("cannot create the fleet CA")?;
    if args.json {
        print_json(&summary)?;
    } else {
        println!("fleet CA    {}", summary.common_name);
        println!("certificate {}", summary.cert.display());
        println!("key         {} (keep it offline)", summary.key.display());
        println!("expires     {}", summary.not_after);
        println!(
            "next: pkgmesh ca issue --dir {} --name NAME --role ROLE --out IDDIR",
            summary.dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn issue(args: IssueArgs) -> anyhow::Result<ExitCode> {
    let summary = pki::issue(&args.dir, &args.name, &args.roles, args.days, &args.out)
        .context("cannot issue the certificate")?;
    if args.json {
        print_json(&summary)?;
    } else {
        println!("name        {}", summary.name);
        println!("roles       {}", pki::roles_list(&summary.roles));
        println!("serial      {}", summary.serial);
        println!(
            "valid       {} to {}",
            summary.not_before, summary.not_after
        );
        println!("identity    {}", summary.dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn revoke(args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let summary = pki::revoke(&args.dir, &args.cert).context("cannot revoke the certificate")?;
    if args.json {
        print_json(&summary)?;
    } else {
        if summary.already_revoked {
            println!("already revoked: nothing changed");
        }
        println!("name        {}", summary.name);
        println!("serial      {}", summary.serial);
        println!(
            "crl         {} (number {}, {} revoked)",
            summary.crl.display(),
            summary.crl_number,
            summary.revoked_count
        );
        println!(
            "next: copy {} into every seed's and node's identity directory (or point --crl at it) and restart them",
            summary.crl.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct ShowReport {
    identity: String,
    name: String,
    roles: Vec<Role>,
    serial: String,
    not_before: String,
    not_after: String,
    expired: bool,
    crls: usize,
}

fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    // Unchecked: showing an expired identity is how an operator finds out that it expired.
    let identity = Identity::load_unchecked(&args.identity)
        .with_context(|| format!("cannot read the identity in {}", args.identity.display()))?;
    let report = ShowReport {
        identity: args.identity.display().to_string(),
        name: identity.name().to_string(),
        roles: identity.roles().to_vec(),
        serial: identity.serial().to_string(),
        not_before: pki::rfc3339(identity.not_before()),
        not_after: pki::rfc3339(identity.not_after()),
        expired: identity.is_expired(),
        crls: identity.crls().len(),
    };
    if args.json {
        print_json(&report)?;
    } else {
        println!("name        {}", report.name);
        println!("roles       {}", pki::roles_list(&report.roles));
        println!("serial      {}", report.serial);
        println!(
            "not after   {}{}",
            report.not_after,
            if report.expired {
                "  EXPIRED: issue a new certificate"
            } else {
                ""
            }
        );
        println!("crls        {}", report.crls);
    }
    Ok(ExitCode::SUCCESS)
}
