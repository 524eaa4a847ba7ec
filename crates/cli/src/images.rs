//! `agentvm images`: the image store of the data directory, without a
//! server (`serve` sees the same store).

use std::path::PathBuf;
use std::process::ExitCode;

use agentvm_image::{Image, ImageError, Limits, Store};
use clap::{Args, Subcommand};

use crate::serve::default_data_dir;

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// The data directory whose store to use (as `agentvm serve`'s).
    #[arg(long, value_name = "DIR", env = "AGENTVM_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: ImagesCmd,
}

/// How much an image may hold, for import and build.
#[derive(Args, Debug)]
struct LimitArgs {
    /// Refuse an image whose files hold more than this (e.g. 8G).
    #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = agentvm_proto::units::parse_size)]
    max_size: u64,
    /// Refuse an image of more entries than this.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    max_entries: u64,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            bytes: self.max_size,
            entries: self.max_entries,
        }
    }
}

#[derive(Subcommand, Debug)]
enum ImagesCmd {
    /// Import an OCI image layout (a directory or its tar) or a `docker
    /// save` archive: every blob checked against its digest, the layers
    /// unpacked once into the store.
    Import {
        file: PathBuf,
        /// Name it (else its org.opencontainers.image.ref.name, or the
        /// archive's RepoTags).
        #[arg(long)]
        tag: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Build a Debian root filesystem from Debian's packages (mmdebstrap,
    /// from the mirror the host's apt uses) and store it as image NAME;
    /// the same build again comes from the cache.
    Build {
        /// The Debian suite or codename: bookworm, stable, trixie...
        #[arg(long, value_name = "SUITE")]
        debian: String,
        /// Packages to install beyond the variant's (a,b,c).
        #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
        packages: Vec<String>,
        /// Package lists after the old system's: minimal, standard (a
        /// toolchain for C, Python and git work) or full (plus Rust, Go,
        /// Node.js); each holds the one before.
        #[arg(long, value_name = "NAME", value_delimiter = ',')]
        preset: Vec<String>,
        /// The Debian archive to install from (default: the host's apt
        /// mirror).
        #[arg(long, value_name = "URL")]
        mirror: Option<String>,
        /// mmdebstrap's variant.
        #[arg(long, default_value = "minbase")]
        variant: String,
        /// Build even if the cache has this build.
        #[arg(long)]
        rebuild: bool,
        /// A cached build older than this many days is built again (so
        /// its packages' security fixes come in).
        #[arg(long, value_name = "DAYS", default_value_t = 7)]
        max_age: u64,
        /// Install from the suite alone, without SUITE-updates and
        /// SUITE-security (a mirror that has neither).
        #[arg(long)]
        no_updates: bool,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        json: bool,
        /// The image's name (a tag).
        name: String,
    },
    /// Pull an image from a registry (the OCI distribution API): every
    /// blob checked against its digest, then imported as `import` does.
    /// REF is [REGISTRY/]REPO[:TAG][@sha256:DIGEST]; the @ pin is checked.
    Pull {
        #[arg(value_name = "REF")]
        reference: String,
        /// Name it (else REF without its pin).
        #[arg(long)]
        tag: Option<String>,
        /// The registry's credentials, in the docker/podman auth file
        /// format (else $REGISTRY_AUTH_FILE, else ~/.docker/config.json).
        #[arg(long, value_name = "FILE")]
        auth_file: Option<PathBuf>,
        /// Speak plain HTTP to the registry (a registry on your own
        /// machine or network without TLS).
        #[arg(long)]
        plain_http: bool,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// The images in the store, oldest import first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One image: its digest, tags, layers and config.
    Show {
        /// A tag, a digest or at least 12 of its hex digits.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Forget an image (its layers go at the next `gc` unless another
    /// image uses them).
    Rm { name: String },
    /// Remove the layers no image uses, and imports that did not finish.
    Gc {
        #[arg(long)]
        json: bool,
    },
}

fn fail(e: ImageError) -> ExitCode {
    eprintln!("agentvm images: {e}");
    ExitCode::from(match e {
        ImageError::NotFound(_) => 2,
        _ => 1,
    })
}

fn short(d: &str) -> &str {
    d.strip_prefix("sha256:")
        .map(|h| &h[..12.min(h.len())])
        .unwrap_or(d)
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("agentvm images: {e}"),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn line(i: &Image) -> String {
    let tags = if i.tags.is_empty() {
        "-".to_string()
    } else {
        i.tags.join(",")
    };
    format!(
        "{}  {:<30}  {:>2} layers  {:>10}  {}",
        short(&i.digest),
        tags,
        i.layers.len(),
        mib(i.bytes),
        i.format
    )
}

/// What import and build print: the digest on stdout (or the image as
/// JSON), a summary on stderr.
fn stored(img: &Image, json: bool, verb: &str) {
    if json {
        print_json(img);
        return;
    }
    println!("{}", img.digest);
    let mut notes = Vec::new();
    if img.devices_skipped > 0 {
        notes.push(format!(
            "{} device nodes or fifos not made",
            img.devices_skipped
        ));
    }
    if img.setid_dropped > 0 {
        notes.push(format!("{} setuid/setgid bits dropped", img.setid_dropped));
    }
    eprintln!(
        "agentvm: {verb} {} ({} layers, {} files, {}){}",
        if img.tags.is_empty() {
            short(&img.digest).to_string()
        } else {
            img.tags.join(", ")
        },
        img.layers.len(),
        img.entries,
        mib(img.bytes),
        if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join(", "))
        }
    );
}

pub fn images(a: ImagesArgs) -> ExitCode {
    let dir = a.data_dir.unwrap_or_else(default_data_dir);
    let store = match Store::open(&dir) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    match a.cmd {
        ImagesCmd::Import {
            file,
            tag,
            limits,
            json,
        } => {
            let limits = limits.limits();
            let mut progress = |l: &str| eprintln!("agentvm: {l}");
            match store.import(&file, tag.as_deref(), limits, &mut progress) {
                Ok(img) => {
                    stored(&img, json, "imported");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        ImagesCmd::Pull {
            reference,
            tag,
            auth_file,
            plain_http,
            limits,
            json,
        } => {
            let r = match crate::pull::Reference::parse(&reference) {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let opts = crate::pull::PullOpts {
                plain_http,
                auth_file,
                tag,
                limits: limits.limits(),
            };
            let mut progress = |l: &str| eprintln!("agentvm: {l}");
            match crate::pull::pull(&store, &r, &opts, &mut progress) {
                Ok(img) => {
                    if r.digest.is_none() && !json {
                        eprintln!(
                            "agentvm: pin it with {}/{}@{}",
                            r.registry, r.repo, img.digest
                        );
                    }
                    stored(&img, json, "pulled");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        ImagesCmd::Build {
            debian,
            packages,
            preset,
            mirror,
            variant,
            rebuild,
            max_age,
            no_updates,
            limits,
            json,
            name,
        } => {
            let spec = match agentvm_image::DebianSpec::new(
                &debian,
                &packages,
                &preset,
                mirror.as_deref(),
                Some(&variant),
            ) {
                Ok(s) if no_updates => s.without_updates(),
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let tool = std::env::var_os("AGENTVM_MMDEBSTRAP")
                .filter(|t| !t.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("mmdebstrap"));
            let opts = agentvm_image::BuildOpts {
                rebuild,
                max_age: std::time::Duration::from_secs(max_age.saturating_mul(86_400)),
                limits: limits.limits(),
            };
            let mut progress = |l: &str| eprintln!("agentvm: {l}");
            match store.build_debian(&spec, &name, &tool, &opts, &mut progress) {
                Ok(b) => {
                    stored(&b.image, json, if b.cached { "cached" } else { "built" });
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        ImagesCmd::List { json } => match store.list() {
            Ok(all) if json => {
                print_json(&all);
                ExitCode::SUCCESS
            }
            Ok(all) => {
                for i in &all {
                    println!("{}", line(i));
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        ImagesCmd::Show { name, json } => match store.find(&name) {
            Ok(i) if json => {
                print_json(&i);
                ExitCode::SUCCESS
            }
            Ok(i) => {
                println!("digest:  {}", i.digest);
                println!("tags:    {}", i.tags.join(", "));
                println!("format:  {} ({}/{})", i.format, i.os, i.architecture);
                println!("files:   {} entries, {}", i.entries, mib(i.bytes));
                if let Some(b) = &i.built {
                    println!("built:   {b}");
                }
                for (n, l) in i.layers.iter().enumerate() {
                    println!("layer {n}: {l}");
                }
                for e in &i.config.env {
                    println!("env:     {e}");
                }
                if !i.config.working_dir.is_empty() {
                    println!("workdir: {}", i.config.working_dir);
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        ImagesCmd::Rm { name } => match store.remove(&name) {
            Ok(i) => {
                eprintln!(
                    "agentvm: removed {}; `agentvm images gc` frees its layers",
                    i.digest
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        ImagesCmd::Gc { json } => match store.gc() {
            Ok(g) if json => {
                print_json(&g);
                ExitCode::SUCCESS
            }
            Ok(g) => {
                eprintln!(
                    "agentvm: removed {} layers and {} unfinished imports; {} layers in use",
                    g.layers_removed, g.unfinished_removed, g.layers_kept
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
    }
}

/// `agentvm run`, with `--image NAME` resolved from the store first.
pub fn run(args: agentvm_runner::run::RunArgs) -> ExitCode {
    let Some(name) = args.image.clone() else {
        return agentvm_runner::run::main(args);
    };
    let dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    // one lookup: the root, the user and the entrypoint all of one image
    let found = Store::open(&dir).and_then(|s| {
        let img = s.find(&name)?;
        let layers = img
            .layers
            .iter()
            .map(|l| s.layer_dir(l))
            .collect::<Result<Vec<_>, _>>()?;
        let user = s.user_of(&img)?;
        let working_dir = match img.config.working_dir.as_str() {
            _ if !args.image_entrypoint => None,
            "" => None,
            w if w.starts_with('/') && !w.contains('\0') => Some(PathBuf::from(w)),
            w => {
                return Err(ImageError::BadArchive(format!(
                    "the image's WorkingDir {w:?} is not an absolute path"
                )))
            }
        };
        let run = agentvm_proto::run::ImageRun {
            working_dir,
            digest: img.digest,
            layers,
            env: img.config.env,
            user: user.map(|u| agentvm_proto::run::RunUser {
                name: u.name,
                uid: u.uid,
                gid: u.gid,
            }),
        };
        Ok((run, img.config.entrypoint, img.config.cmd))
    });
    let mut args = args;
    let found = found.map(|(run, entrypoint, cmd)| {
        if args.image_entrypoint {
            let rest: Vec<std::ffi::OsString> = if args.command.is_empty() {
                cmd.iter().map(Into::into).collect()
            } else {
                std::mem::take(&mut args.command)
            };
            let mut argv: Vec<std::ffi::OsString> = entrypoint.iter().map(Into::into).collect();
            argv.extend(rest);
            args.command = argv;
        }
        run
    });
    if found.is_ok() && args.command.is_empty() {
        eprintln!("agentvm: --image-entrypoint: the image {name} has neither Entrypoint nor Cmd; give a COMMAND");
        return ExitCode::from(agentvm_runner::EXIT_SETUP);
    }
    match found {
        Ok(img) => agentvm_runner::run::main_on(args, Some(img)),
        Err(e) => {
            eprintln!(
                "agentvm: --image {name}: {e} (in {}; `agentvm images list` shows what there is)",
                dir.join("images").display()
            );
            ExitCode::from(agentvm_runner::EXIT_SETUP)
        }
    }
}

/// The doctor's `images` line: the store and what it holds (read only:
/// doctor makes no store).
pub fn doctor_check(data_dir: Option<PathBuf>) -> agentvm_sandbox::doctor::Check {
    let dir = data_dir.unwrap_or_else(default_data_dir);
    let at = dir.join("images");
    let (ok, detail) = if !at.is_dir() {
        (
            true,
            format!(
                "no image store yet at {} (agentvm images import FILE makes one); sandboxes use the host's system directories",
                at.display()
            ),
        )
    } else {
        match Store::open(&dir).and_then(|s| s.list()) {
            Ok(all) => {
                let names: Vec<String> = all
                    .iter()
                    .map(|i| {
                        i.tags
                            .first()
                            .cloned()
                            .unwrap_or_else(|| short(&i.digest).to_string())
                    })
                    .collect();
                (
                    true,
                    format!(
                        "{} in {}{}; run one with --image NAME",
                        match all.len() {
                            1 => "1 image".to_string(),
                            n => format!("{n} images"),
                        },
                        at.display(),
                        if names.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", names.join(", "))
                        }
                    ),
                )
            }
            Err(e) => (
                false,
                format!("the image store at {} cannot be read: {e}", at.display()),
            ),
        }
    };
    agentvm_sandbox::doctor::Check {
        layer: "images",
        ok,
        detail,
    }
}
