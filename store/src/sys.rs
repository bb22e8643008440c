//! The system calls of the file stores, in one place, through rustix. `statx` (glibc 2.28) and
//! `preadv2` / `pwritev2` (glibc 2.26) are not wrapped by glibc 2.17 (CentOS 7, the XenServer /
//! XCP-ng dom0 userland); rustix's Linux backend makes the system calls itself, so the binary
//! needs no newer glibc symbol, and the kernel decides whether a call exists (ENOSYS on
//! kernels older than the call). Flags keep their kernel values (`libc::RWF_*`,
//! `libc::FALLOC_FL_*`) so callers match errno and flags the way the man pages name them.

use rustix::fs::{AtFlags, FallocateFlags, Statx, StatxFlags};
use rustix::io::ReadWriteFlags;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsFd;

/// `preadv2(fd, [buf], pos, flags)`: bytes read.
pub fn preadv2(fd: impl AsFd, buf: &mut [u8], pos: u64, flags: i32) -> io::Result<usize> {
    let flags = ReadWriteFlags::from_bits_retain(flags as u32);
    Ok(rustix::io::preadv2(
        fd,
        &mut [IoSliceMut::new(buf)],
        pos,
        flags,
    )?)
}

/// `pwritev2(fd, [buf], pos, flags)`: bytes written.
pub fn pwritev2(fd: impl AsFd, buf: &[u8], pos: u64, flags: i32) -> io::Result<usize> {
    let flags = ReadWriteFlags::from_bits_retain(flags as u32);
    Ok(rustix::io::pwritev2(fd, &[IoSlice::new(buf)], pos, flags)?)
}

/// `fdatasync(fd)`.
pub fn fdatasync(fd: impl AsFd) -> io::Result<()> {
    Ok(rustix::fs::fdatasync(fd)?)
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: impl AsFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let mode = FallocateFlags::from_bits_retain(mode as u32);
    Ok(rustix::fs::fallocate(fd, mode, offset, len)?)
}

/// `pread(fd, buf, pos)`: bytes read.
pub fn pread(fd: impl AsFd, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    Ok(rustix::io::pread(fd, buf, pos)?)
}

/// `pwrite(fd, buf, pos)`: bytes written.
pub fn pwrite(fd: impl AsFd, buf: &[u8], pos: u64) -> io::Result<usize> {
    Ok(rustix::io::pwrite(fd, buf, pos)?)
}

/// `statx(fd, "", AT_EMPTY_PATH, mask)`.
pub fn statx(fd: impl AsFd, mask: StatxFlags) -> io::Result<Statx> {
    Ok(rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, mask)?)
}

/// The symbolic name of an errno for log lines and status ("ENOSYS", else "errno N").
pub fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENOMEM) => "ENOMEM",
        Some(libc::EACCES) => "EACCES",
        Some(n) => return format!("errno {n}"),
        None => return e.to_string(),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn vectored_calls_and_statx() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let fd = f.as_file();
        assert_eq!(
            pwritev2(fd, &[1u8; 512], 4096, libc::RWF_DSYNC).unwrap(),
            512
        );
        let mut buf = [0u8; 1024];
        assert_eq!(preadv2(fd, &mut buf, 3584, 0).unwrap(), 1024);
        assert!(buf[..512].iter().all(|&b| b == 7));
        assert!(buf[512..].iter().all(|&b| b == 1));
        // Past the end: 0 bytes, not an error.
        assert_eq!(preadv2(fd, &mut buf, 1 << 20, 0).unwrap(), 0);
        let stx = statx(fd, StatxFlags::SIZE).unwrap();
        assert_eq!(stx.stx_size, 8192);
        // A write-only descriptor cannot be read: the kernel's errno comes through.
        let wo = std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap();
        let bad = preadv2(&wo, &mut buf, 0, 0).unwrap_err();
        assert_eq!(bad.raw_os_error(), Some(libc::EBADF));
        assert_eq!(
            errno_name(&io::Error::from_raw_os_error(libc::ENOSYS)),
            "ENOSYS"
        );
        assert_eq!(errno_name(&io::Error::from_raw_os_error(5)), "errno 5");
    }
}
