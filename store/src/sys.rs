//! The raw system calls of the file stores, in one place. `statx` (glibc 2.28) and `preadv2` /
//! `pwritev2` (glibc 2.26) are not wrapped by glibc 2.17 (CentOS 7, the XenServer / XCP-ng dom0
//! userland): calling them through `libc::syscall` keeps the binary free of newer symbol
//! versions, and the kernel decides whether they exist (ENOSYS on kernels older than the call).

use std::io;
use std::os::fd::RawFd;

/// `preadv2` / `pwritev2` (`sysno`) of one buffer at `pos`.
///
/// # Safety
/// `base` must be valid for `len` bytes: writable for preadv2, readable for pwritev2.
unsafe fn rw_v2(
    sysno: libc::c_long,
    fd: RawFd,
    base: *mut libc::c_void,
    len: usize,
    pos: u64,
    flags: i32,
) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: base,
        iov_len: len,
    };
    // SAFETY: the iovec is valid per the caller. On 64-bit targets the kernel takes the whole
    // offset in pos_l and ignores pos_h.
    let n = unsafe {
        libc::syscall(
            sysno,
            fd,
            &iov as *const libc::iovec,
            1,
            pos as libc::c_long,
            0 as libc::c_long,
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `preadv2(fd, [buf], pos, flags)`: bytes read.
pub fn preadv2(fd: RawFd, buf: &mut [u8], pos: u64, flags: i32) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes for its length.
    unsafe {
        rw_v2(
            libc::SYS_preadv2,
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            pos,
            flags,
        )
    }
}

/// `pwritev2(fd, [buf], pos, flags)`: bytes written.
pub fn pwritev2(fd: RawFd, buf: &[u8], pos: u64, flags: i32) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads for its length; the kernel does not write to it.
    unsafe {
        rw_v2(
            libc::SYS_pwritev2,
            fd,
            buf.as_ptr() as *mut libc::c_void,
            buf.len(),
            pos,
            flags,
        )
    }
}

/// `fdatasync(fd)`.
pub fn fdatasync(fd: i32) -> io::Result<()> {
    // SAFETY: plain syscall on an fd the store keeps open.
    if unsafe { libc::fdatasync(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: i32, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd the store keeps open.
    let rc = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `pread(fd, buf, pos)`: bytes read.
pub fn pread(fd: i32, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes for its length.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), pos as libc::off_t) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `pwrite(fd, buf, pos)`: bytes written.
pub fn pwrite(fd: i32, buf: &[u8], pos: u64) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads for its length.
    let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), pos as libc::off_t) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `statx(fd, "", AT_EMPTY_PATH, mask)`.
pub fn statx(fd: RawFd, mask: u32) -> io::Result<libc::statx> {
    // SAFETY: all-zero is a valid statx.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string and stx is writable for its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            mask,
            &mut stx as *mut libc::statx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stx)
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
    use std::os::fd::AsRawFd;

    #[test]
    fn raw_vectored_calls_and_statx() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let fd = f.as_raw_fd();
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
        let stx = statx(fd, libc::STATX_SIZE).unwrap();
        assert_eq!(stx.stx_size, 8192);
        let bad = preadv2(-1, &mut buf, 0, 0).unwrap_err();
        assert_eq!(bad.raw_os_error(), Some(libc::EBADF));
        assert_eq!(
            errno_name(&io::Error::from_raw_os_error(libc::ENOSYS)),
            "ENOSYS"
        );
        assert_eq!(errno_name(&io::Error::from_raw_os_error(5)), "errno 5");
    }
}
