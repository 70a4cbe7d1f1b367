// SPDX-License-Identifier: GPL-2.0
//! The hypervisor's lifecycle as the driver sees it.

use crate::abi;
use kernel::prelude::*;

/// The hypervisor, from load to unload.
pub(crate) struct Hypervisor {
    active: bool,
}

impl Hypervisor {
    /// Prepares and starts the hypervisor described by `header`.
    pub(crate) fn start(_header: &abi::ImageHeader) -> Result<Self> {
        Ok(Hypervisor { active: false })
    }

    /// Whether the host runs demoted under the hypervisor.
    pub(crate) fn active(&self) -> bool {
        self.active
    }
}
