//! Every migration file in the workspace is listed in its crate's `sql_store::migrations!`
//! call: a file added to `migrations/<owner>/` but not listed would never run.

use std::path::{Path, PathBuf};

fn files(dir: &Path, extension: &str, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, extension, found);
        } else if path.extension().is_some_and(|found| found == extension) {
            found.push(path);
        }
    }
}

#[test]
fn every_migration_file_is_listed_in_its_crate() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned();
    let mut checked = 0;
    for member in std::fs::read_dir(&workspace)
        .expect("the workspace")
        .flatten()
    {
        let migrations = member.path().join("migrations");
        if !migrations.is_dir() {
            continue;
        }
        let mut sql = Vec::new();
        files(&migrations, "sql", &mut sql);
        let mut sources = Vec::new();
        files(&member.path().join("src"), "rs", &mut sources);
        let code: String = sources
            .iter()
            .map(|path| std::fs::read_to_string(path).expect("a source file"))
            .collect();
        for file in sql {
            let relative = file
                .strip_prefix(member.path())
                .expect("under the crate")
                .to_string_lossy()
                .into_owned();
            assert!(
                code.contains(&format!("{relative}\"")),
                "{} is not listed in a sql_store::migrations! call of {}",
                file.display(),
                member.path().display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "found only {checked} migration files");
}
