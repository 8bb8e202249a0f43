//! `.npz` archives (a zip of `.npy` members, uncompressed), as `numpy.savez` writes and
//! `numpy.load` reads them.

use std::io::{Cursor, Read, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;

use super::atomic::write_atomic;
use super::npy::NpyArray;
use crate::error::{Error, Result};

/// Writes named arrays to `path` atomically (all members or no file).
pub fn write_npz(path: &Path, arrays: &[(&str, NpyArray)]) -> Result<()> {
    let fail =
        |e: zip::result::ZipError| Error::io("cannot encode", path, std::io::Error::other(e));
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(false);
    for (name, array) in arrays {
        zip.start_file(format!("{name}.npy"), options)
            .map_err(fail)?;
        zip.write_all(&array.to_bytes())
            .map_err(|e| Error::io("cannot encode", path, e))?;
    }
    let bytes = zip.finish().map_err(fail)?.into_inner();
    write_atomic(path, &bytes)
}

/// Reads every member of an `.npz` archive, in archive order, names without `.npy`.
pub fn read_npz(path: &Path) -> Result<Vec<(String, NpyArray)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read", path, e))?;
    let fail = |message: String| Error::Array {
        path: path.to_path_buf(),
        message,
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| fail(format!("not a valid .npz (zip) archive: {e}")))?;
    let mut out = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let mut member = archive
            .by_index(i)
            .map_err(|e| fail(format!("member {i}: {e}")))?;
        let name = member
            .name()
            .map_err(|e| fail(format!("member {i} has no readable name: {e}")))?
            .trim_end_matches(".npy")
            .to_string();
        let mut data = Vec::new();
        member
            .read_to_end(&mut data)
            .map_err(|e| fail(format!("member {name}: {e}")))?;
        out.push((
            name.clone(),
            NpyArray::from_bytes(&data, &path.join(&name))?,
        ));
    }
    Ok(out)
}
