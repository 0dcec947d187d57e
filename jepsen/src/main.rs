//! `keel-jepsen`: checks histories for linearizability (the fault-injection runner comes next).

use clap::{Parser, Subcommand, ValueEnum};
use keel_jepsen::linearizable::{Verdict, check};

#[derive(Parser)]
#[command(name = "keel-jepsen", version, about = "Jepsen-style testing for Keel")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Model {
    CasRegister,
}

#[derive(Subcommand)]
enum Command {
    /// Checks Jepsen register logs; prints `linearizable: true|false` per file. Exit status 0
    /// when every file was checked (whatever the verdicts), 1 on unreadable input, 2 when a
    /// check ran out of its step budget.
    CheckJepsenLog {
        #[arg(long, value_enum, default_value = "cas-register")]
        model: Model,
        /// Search steps allowed per key before answering "unknown".
        #[arg(long, default_value_t = 50_000_000)]
        max_steps: u64,
        /// Print a JSON object per file instead of text.
        #[arg(long)]
        json: bool,
        files: Vec<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckJepsenLog {
            model: Model::CasRegister,
            max_steps,
            json,
            files,
        } => {
            let many = files.len() > 1;
            let mut unknown = false;
            for file in &files {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let ops = keel_jepsen::jepsen_log::parse(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let verdict = check(&ops, max_steps);
                let answer = match &verdict {
                    Verdict::Linearizable => "true",
                    Verdict::Violation { .. } => "false",
                    Verdict::Unknown => {
                        unknown = true;
                        "unknown"
                    }
                };
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"file": file.display().to_string(), "linearizable": answer, "operations": ops.len()})
                    );
                } else if many {
                    println!("{}: linearizable: {answer}", file.display());
                } else {
                    println!("linearizable: {answer}");
                }
                if let Verdict::Violation {
                    stuck_at,
                    linearized,
                    ..
                } = &verdict
                {
                    if !json {
                        eprintln!(
                            "  longest linearizable prefix: {} operations; cannot place: {stuck_at:?}",
                            linearized.len()
                        );
                    }
                }
            }
            if unknown {
                std::process::exit(2);
            }
            Ok(())
        }
    }
}
