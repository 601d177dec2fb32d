//! The ways operators change a file under a running service, for tests of
//! hot-reloaded files.

use std::{io::Write, path::Path, time::Duration};

#[derive(Debug, Clone, Copy)]
pub enum Rewrite {
    /// `std::fs::write`, `cat > f`: truncate, then write.
    InPlace,
    /// Truncate, then the text in small chunks with pauses (an editor, a
    /// copy over the network).
    Slowly,
    /// Written beside it, then renamed over it (atomic).
    Rename,
    /// Deleted, then created again (long enough apart for several reloads
    /// to find no file at all).
    Recreate,
}

impl Rewrite {
    pub const ALL: [Rewrite; 4] = [
        Rewrite::InPlace,
        Rewrite::Slowly,
        Rewrite::Rename,
        Rewrite::Recreate,
    ];
}

/// Replaces `path`'s content with `text` the way `how` says.
pub fn rewrite(path: &Path, text: &str, how: Rewrite) {
    match how {
        Rewrite::InPlace => std::fs::write(path, text).expect("write the file"),
        Rewrite::Slowly => {
            let mut f = std::fs::File::create(path).expect("truncate the file");
            for chunk in text.as_bytes().chunks(8) {
                f.write_all(chunk).expect("write a chunk");
                f.flush().expect("flush a chunk");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Rewrite::Rename => {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write beside it");
            std::fs::rename(&tmp, path).expect("rename over it");
        }
        Rewrite::Recreate => {
            std::fs::remove_file(path).expect("delete the file");
            std::thread::sleep(Duration::from_millis(150));
            std::fs::write(path, text).expect("create it again");
        }
    }
}
