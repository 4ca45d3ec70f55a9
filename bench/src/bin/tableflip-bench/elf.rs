//! Binary sizes: the file, and the part of it that is loaded (the
//! `PT_LOAD` segments of a 64-bit little-endian ELF file), which leaves
//! out debug information and symbol tables.

use std::path::Path;

use crate::Error;

const PT_LOAD: u32 = 1;

/// The file's size and the total file size of its `PT_LOAD` segments.
pub(crate) fn sizes(path: &Path) -> Result<(u64, u64), Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
    let loaded = loaded_size(&bytes)
        .ok_or_else(|| Error::msg(format!("{}: not a 64-bit ELF file", path.display())))?;
    Ok((bytes.len() as u64, loaded))
}

fn loaded_size(b: &[u8]) -> Option<u64> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    // Magic, ELFCLASS64, little-endian.
    if b.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut total = 0;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph)? == PT_LOAD {
            total += u64_at(ph + 0x20)?; // p_filesz
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_its_own_binary() {
        let exe = std::env::current_exe().expect("current exe");
        let (file, loaded) = super::sizes(&exe).expect("an ELF file");
        assert!(loaded > 0 && loaded <= file, "{loaded} of {file}");
    }
}
