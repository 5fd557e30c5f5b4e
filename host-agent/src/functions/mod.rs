//! The function registry: what a function is, how it is stored, and how its code is unpacked.

mod archive;
mod config;
mod store;

pub use archive::{
    build_zip, extract_zip, zip_dir, ArchiveError, ZipEntry, MAX_UNZIPPED_BYTES, MAX_ZIP_BYTES,
};
pub use config::{
    name_constraint, parse_function_ref, ConcurrencySettings, CreateFunctionRequest,
    FunctionConfiguration, FunctionRef, NewFunction, ProvisionedSetting, Runtime, ValidationError,
};
pub use store::{Function, Registry, RegistryError};
