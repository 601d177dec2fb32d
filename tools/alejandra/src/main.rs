//! `alejandra [--check] [PATH...]`: formats `.nix` files with the alejandra
//! library (the code the alejandra CLI runs). Directories are walked for
//! `*.nix`. With `--check` nothing is written, and the exit status is 2 when
//! a file would change, 1 on a parse error, 0 otherwise (the CLI's meaning).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for entry in entries {
            let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name == "target" || name == "result" {
                continue;
            }
            if entry.is_dir() || name.ends_with(".nix") {
                collect(&entry, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut check = false;
    let mut paths = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" | "-c" => check = true,
            "--help" | "-h" => {
                println!("usage: alejandra [--check] [PATH...]   (default PATH: .)");
                return ExitCode::SUCCESS;
            }
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    if paths.is_empty() {
        paths.push(PathBuf::from("."));
    }
    let mut files = Vec::new();
    for path in &paths {
        if let Err(err) = collect(path, &mut files) {
            eprintln!("alejandra: {}: {err}", path.display());
            return ExitCode::from(1);
        }
    }

    let (mut failed, mut changed) = (false, 0usize);
    for file in &files {
        let name = file.display().to_string();
        let before = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("alejandra: {name}: {err}");
                failed = true;
                continue;
            }
        };
        match alejandra::format::in_memory(name.clone(), before) {
            (alejandra::format::Status::Error(err), _) => {
                eprintln!("alejandra: {name}: {err}");
                failed = true;
            }
            (alejandra::format::Status::Changed(false), _) => {}
            (alejandra::format::Status::Changed(true), after) => {
                changed += 1;
                if check {
                    eprintln!("alejandra: {name}: not formatted");
                } else if let Err(err) = std::fs::write(file, after) {
                    eprintln!("alejandra: {name}: {err}");
                    failed = true;
                } else {
                    eprintln!("alejandra: {name}: formatted");
                }
            }
        }
    }
    println!(
        "alejandra: {} file(s) checked, {changed} {}",
        files.len(),
        if check {
            "need formatting"
        } else {
            "reformatted"
        }
    );
    if failed {
        ExitCode::from(1)
    } else if check && changed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
