//! The file's blocks go to the device only where products may read them: not where
//! `TOLLGATE_SMALL_PRODUCTS` fixes the products of few rows on cuBLAS or the f16 rows. A
//! process of its own, since the variable is read wherever the GPU's weights are made.

mod common;

use common::tiny;
use kernels::cuda::backend::{CudaBackend, KvCapacity};
use kernels::cuda::twins::TwinModel;

#[test]
fn blocks_stay_off_the_device_where_no_product_reads_them() {
    let model = tiny("blocks-env");
    for (fixed, held) in [
        (Some("gemv"), false),
        (Some("cublas"), false),
        (Some("quant"), true),
        (None, true),
    ] {
        match fixed {
            Some(v) => std::env::set_var("TOLLGATE_SMALL_PRODUCTS", v),
            None => std::env::remove_var("TOLLGATE_SMALL_PRODUCTS"),
        }
        let twin = TwinModel::from_model(&model);
        let Some(emu) = common::emu_for(&twin.config) else {
            return;
        };
        let b =
            CudaBackend::on(emu, "emu".into(), &twin, 16, KvCapacity::Blocks(8), 16, 2).unwrap();
        assert_eq!(b.has_quant(), held, "{fixed:?}");
    }
}
