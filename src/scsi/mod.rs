//! SCSI command handling for direct-access logical units (SPC-4 / SBC-3), independent of iSCSI.
//!
//! The transport hands a [`ScsiTarget`] a LUN, a CDB and the Data-Out bytes; it gets back a
//! status, optional sense data and the Data-In bytes the command produced (at their natural
//! length: the transport truncates to the initiator's expected length and reports residuals).

pub mod alua;
pub mod cdb;
pub mod compat;
pub mod limits;
pub mod medium;
pub mod pr;
pub mod sanitize;
pub mod sbc;
pub mod sense;
pub mod spc;
pub mod stats;
mod target;
pub mod thin;
mod unit;
pub mod xcopy;

pub use sense::{Sense, SenseKey};
pub use target::{PlannedCommand, ScsiTarget, ThinAlertHook};
pub use unit::{LogicalUnit, PrReplicateFuture, PrReplicator};

use bytes::Bytes;

/// SAM status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Good = 0x00,
    CheckCondition = 0x02,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    TaskAborted = 0x40,
}

/// Identifies an I_T nexus (one iSCSI session) for unit attentions and reservations.
pub type NexusId = u64;

/// One command as the transport received it.
#[derive(Debug, Clone)]
pub struct ScsiRequest {
    pub cdb: Bytes,
    /// Data-Out received for the command (already gathered from immediate, unsolicited and
    /// solicited data). Its length is what the initiator actually sent.
    pub data_out: Bytes,
    /// iSCSI ExpectedDataTransferLength.
    pub expected_len: u32,
    pub nexus: NexusId,
}

/// Result of one command.
#[derive(Debug, Clone)]
pub struct ScsiResponse {
    pub status: Status,
    /// Sense data bytes (fixed format), present with CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// Data-In the command produced.
    pub data_in: Bytes,
}

impl ScsiResponse {
    pub fn good(data_in: Bytes) -> Self {
        ScsiResponse {
            status: Status::Good,
            sense: None,
            data_in,
        }
    }
    pub fn check(sense: Sense) -> Self {
        ScsiResponse {
            status: Status::CheckCondition,
            sense: Some(sense.to_fixed_bytes()),
            data_in: Bytes::new(),
        }
    }
}

/// What the transport must do before a command can run. `P` is what execution takes: the
/// target's [`PlannedCommand`] (a transport's unit tests may plan with their own type).
#[derive(Debug, Clone)]
pub enum DataOutPlan<P = PlannedCommand> {
    /// No Data-Out; execute the command now.
    None(P),
    /// Gather this many bytes of Data-Out (as the CDB says), then execute the command.
    Gather(u32, P),
    /// The CDB is already known to fail (bad opcode/field, LBA out of range, write protected,
    /// unit attention...): respond with this, without soliciting data.
    Fail(ScsiResponse),
}

/// The identity a logical unit presents in INQUIRY and VPD pages. Two hosts configured
/// alike must produce byte-identical identity (XenServer keys its SR on VPD 0x83).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunIdentity {
    /// T10 vendor identification, space-padded to 8 bytes.
    pub vendor: String,
    /// Product identification, space-padded to 16 bytes.
    pub product: String,
    /// Product revision level, space-padded to 4 bytes.
    pub revision: String,
    /// VPD 0x80 unit serial number (ASCII).
    pub serial: String,
    /// NAA designator (8 or 16 bytes; NAA 6 IEEE registered extended is 16).
    pub naa: Vec<u8>,
    /// T10 vendor-id designator's vendor-specific part (follows the 8-byte vendor id).
    pub t10_vendor_specific: String,
    /// SCSI name string of the target port: "<target iqn>,t,0x<tpgt as 4 hex digits>".
    pub target_port_name: String,
    /// Relative target port identifier (VPD 0x83 designator type 4).
    pub relative_port: u16,
    /// Target port group (designator type 5), presented when `Some`; `Some` exactly when the
    /// logical unit has ALUA, which standard INQUIRY then reports (TPGS=01b, implicit).
    pub port_group: Option<u16>,
    /// When set, standard INQUIRY and VPD 0x00/0x80/0x83 are exactly what tgt or IET
    /// presented for this LUN (migration without changing the disk's identity).
    pub compat: Option<compat::CompatIdentity>,
}

/// Per-LUN settings the SCSI layer needs.
#[derive(Debug, Clone)]
pub struct LunSettings {
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Physical block size (a power of two, at least `block_size`): READ CAPACITY(16)'s
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (SBC-3 5.16.2).
    pub physical_block_size: u32,
    pub read_only: bool,
    pub identity: LunIdentity,
    /// Reported in the caching mode page (WCE); true when the store has a volatile cache
    /// that SYNCHRONIZE CACHE must flush.
    pub write_cache: bool,
    /// Whether UNMAP / WRITE SAME with UNMAP are offered (thin provisioning VPD 0xB2).
    pub thin_provisioning: bool,
    /// Soft threshold on the backing filesystem's usage (`thin_threshold_percent`): unit
    /// attention 38/07 when crossed. Only with `thin_provisioning` on a file.
    pub thin_threshold: Option<thin::ThinThreshold>,
    /// Bytes per second a SANITIZE OVERWRITE writes at most (`sanitize_rate`); 0 = no limit.
    pub sanitize_rate: u64,
    /// A removable medium (`removable`): RMB in standard INQUIRY, PREVENT ALLOW MEDIUM
    /// REMOVAL, and START STOP UNIT with LOEJ unloads and loads it (SBC-3 5.12, 5.25).
    pub removable: bool,
}
