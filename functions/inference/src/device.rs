//! Where and in which precision a model runs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::{EngineError, Result};

/// A device as people name it: `cpu`, `cuda` (the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// The CUDA device with this index.
    Cuda(usize),
}

impl DeviceSpec {
    /// The precision to run in when none is named: f16 on a GPU, f32 on the CPU (where many
    /// kernels lack half precision).
    pub fn default_dtype(self) -> DType {
        match self {
            DeviceSpec::Cpu => DType::F32,
            DeviceSpec::Cuda(_) => DType::F16,
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|index| index.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| EngineError::UnknownDevice(s.to_owned())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

/// Floating-point precision of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float: the CPU default and the reference precision.
    F32,
    /// IEEE half: the usual GPU precision for SDXL (needs the fp16-safe VAE or an f32 VAE).
    F16,
    /// bfloat16: half the memory of f32 with f32's range.
    Bf16,
}

impl DType {
    /// The libtorch kind.
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::F16 => Kind::Half,
            DType::Bf16 => Kind::BFloat16,
        }
    }
}

impl FromStr for DType {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            _ => Err(EngineError::UnknownDType(s.to_owned())),
        }
    }
}

/// How many CUDA devices this process can use.
pub fn cuda_device_count() -> usize {
    usize::try_from(tch::Cuda::device_count()).unwrap_or(0)
}

/// Checks that the machine can run `dtype` on `device` and returns the libtorch pair.
pub fn resolve(device: DeviceSpec, dtype: DType) -> Result<(Device, Kind)> {
    match device {
        DeviceSpec::Cpu if dtype == DType::F16 => Err(EngineError::HalfOnCpu),
        DeviceSpec::Cpu => Ok((Device::Cpu, dtype.kind())),
        DeviceSpec::Cuda(index) => {
            let available = cuda_device_count();
            if index >= available {
                return Err(EngineError::CudaUnavailable {
                    requested: index,
                    available,
                });
            }
            Ok((Device::Cuda(index), dtype.kind()))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tch::Tensor;

    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["tpu", "cuda:", "cuda:x", ""] {
            assert!(
                matches!(
                    bad.parse::<DeviceSpec>(),
                    Err(EngineError::UnknownDevice(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn dtype_names_parse() {
        assert_eq!("bf16".parse::<DType>().unwrap(), DType::Bf16);
        assert_eq!("fp16".parse::<DType>().unwrap(), DType::F16);
        assert_eq!("F32".parse::<DType>().unwrap().kind(), Kind::Float);
        assert!(matches!(
            "f8".parse::<DType>(),
            Err(EngineError::UnknownDType(_))
        ));
    }

    #[test]
    fn half_precision_on_the_cpu_is_refused() {
        assert!(matches!(
            resolve(DeviceSpec::Cpu, DType::F16),
            Err(EngineError::HalfOnCpu)
        ));
    }

    #[test]
    fn asking_for_a_missing_gpu_is_a_typed_error() {
        let missing = cuda_device_count();
        match resolve(DeviceSpec::Cuda(missing), DType::F16) {
            Err(EngineError::CudaUnavailable {
                requested,
                available,
            }) => {
                assert_eq!((requested, available), (missing, missing));
            }
            other => panic!("expected CudaUnavailable, got {other:?}"),
        }
    }

    #[test]
    fn libtorch_computes_on_the_resolved_device() {
        let device = if cuda_device_count() > 0 {
            DeviceSpec::Cuda(0)
        } else {
            DeviceSpec::Cpu
        };
        for dtype in [DType::F32, DType::Bf16] {
            let (device, kind) = resolve(device, dtype).unwrap();
            let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
                .reshape([2, 2])
                .to_device(device)
                .to_kind(kind);
            let product = a.matmul(&a).to_kind(Kind::Float).to_device(Device::Cpu);
            let values: Vec<f32> = Vec::try_from(product.flatten(0, 1)).unwrap();
            assert_eq!(values, vec![7.0, 10.0, 15.0, 22.0]);
        }
    }
}
