# The agent and its eBPF object. The eBPF side needs a nightly rustc with
# rust-src and bpf-linker built against that rustc's LLVM, as in the
# project's xtask; here they come from rust-overlay-free nixpkgs inputs.
{ lib, rustPlatform, rust-bin ? null, bpf-linker, pkg-config, installShellFiles }:

rustPlatform.buildRustPackage {
  pname = "corral";
  version = "0.1.0";
  src = lib.cleanSource ../.;
  cargoLock.lockFile = ../Cargo.lock;
  cargoBuildFlags = [ "-p" "corral" ];
  doCheck = false; # the tests load eBPF and need root
  nativeBuildInputs = [ bpf-linker pkg-config installShellFiles ];
  # aya-build builds ebpf/ with `cargo +nightly`; let it use this toolchain.
  RUSTC_BOOTSTRAP = "1";
  postInstall = ''
    install -Dm644 policies/default.toml $out/share/corral/default.toml
    install -Dm644 packaging/corral.service $out/lib/systemd/system/corral.service
    substituteInPlace $out/lib/systemd/system/corral.service --replace /usr/bin/corral $out/bin/corral
    $out/bin/corral man > corral.1
    installManPage corral.1
  '';
  meta = {
    description = "eBPF-assisted scheduler agent: process classes on their own cores, VRAM budgets";
    license = with lib.licenses; [ mit asl20 ];
    platforms = lib.platforms.linux;
    mainProgram = "corral";
  };
}
