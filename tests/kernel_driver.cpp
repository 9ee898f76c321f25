// Runs cpu.cpp's kernels on inputs from files, for a build that cannot be loaded into this Python process: the
// aarch64 targets, cross-compiled and run under qemu-aarch64 (tests/test_kernels_aarch64.py writes the inputs and
// reads the outputs back).
//
//   kernel_driver CASE_DIR...
//
// Each CASE_DIR holds case.txt, one line: the kernel's name, then name=value arguments (e.g.
// "int4_linear M=7 K=576 N=40 g=64"), and one raw little-endian file per input array (x.bin, bias.bin, ...; an
// optional one left out is a null pointer). The kernel's outputs are written beside them (out.bin, ...).
// Threads: OMP_NUM_THREADS, passed on as the kernels' nthreads.

#include "../pocketlm/kernels/cpu.cpp"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>

struct Case {
    std::string dir, kernel;
    std::map<std::string, double> args;

    double arg(const std::string &name) const {
        auto it = args.find(name);
        if (it == args.end()) throw std::runtime_error(dir + ": case.txt has no " + name);
        return it->second;
    }
    int64_t int_arg(const std::string &name) const { return int64_t(arg(name)); }

    // the file's elements; an optional input that is not there: none (or_null makes it a null pointer)
    template <typename T>
    std::vector<T> read(const std::string &name, bool optional = false) const {
        std::ifstream f(dir + "/" + name, std::ios::binary);
        if (!f && optional) return {};
        if (!f) throw std::runtime_error(dir + ": no " + name);
        std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        std::vector<T> out(bytes.size() / sizeof(T));
        std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
        return out;
    }

    template <typename T>
    void write(const std::string &name, const std::vector<T> &v) const {
        std::ofstream f(dir + "/" + name, std::ios::binary);
        f.write(reinterpret_cast<const char *>(v.data()), std::streamsize(v.size() * sizeof(T)));
        if (!f) throw std::runtime_error(dir + ": could not write " + name);
    }
};

static Case read_case(const std::string &dir) {
    std::ifstream f(dir + "/case.txt");
    Case c{dir, "", {}};
    if (!(f >> c.kernel)) throw std::runtime_error(dir + ": no case.txt");
    for (std::string word; f >> word;) {
        const size_t eq = word.find('=');
        c.args[word.substr(0, eq)] = std::stod(word.substr(eq + 1));
    }
    return c;
}

template <typename T>
static const T *or_null(const std::vector<T> &v) { return v.empty() ? nullptr : v.data(); }

static const int THREADS = omp_get_max_threads();

// codes.bin (N, K/2) uint8, scales_and_zeros.bin (K/g, N, 2) bf16 -> packed.bin (int4_pack's layout);
// x.bin (M, K) fp32, bias.bin (N) or none -> out.bin (M, N)
static void run_int4_linear(const Case &c) {
    const int64_t M = c.int_arg("M"), K = c.int_arg("K"), N = c.int_arg("N"), g = c.int_arg("g");
    std::vector<uint8_t> packed(int4_packed_bytes(N, K, g, INT4_ZEROS));
    int4_pack(c.read<uint8_t>("codes.bin").data(), c.read<uint16_t>("scales_and_zeros.bin").data(), N, K, g, packed.data());
    std::vector<float> out(M * N);
    const auto x = c.read<float>("x.bin"), bias = c.read<float>("bias.bin", true);
    int4_linear(x.data(), M, K, packed.data(), N, g, INT4_ZEROS, or_null(bias), out.data(), THREADS);
    c.write("packed.bin", packed), c.write("out.bin", out);
}

// blocks.bin: a GGML tensor (N, K) of type `type` (ggml's id) -> packed.bin (int4_pack_gguf's `layout`); x.bin (M, K)
// fp32, bias.bin (N) or none -> out.bin (M, N)
static void run_int4_linear_gguf(const Case &c) {
    const int64_t M = c.int_arg("M"), K = c.int_arg("K"), N = c.int_arg("N");
    const int type = int(c.int_arg("type")), layout = int(c.int_arg("layout"));
    std::vector<uint8_t> packed(int4_packed_bytes(N, K, 32, layout));
    int4_pack_gguf(c.read<uint8_t>("blocks.bin").data(), type, N, K, nullptr, layout, packed.data());
    std::vector<float> out(M * N);
    const auto x = c.read<float>("x.bin"), bias = c.read<float>("bias.bin", true);
    int4_linear(x.data(), M, K, packed.data(), N, 32, layout, or_null(bias), out.data(), THREADS);
    c.write("packed.bin", packed), c.write("out.bin", out);
}

// weight.bin (N, K) int8 -> packed.bin (int8_pack's layout); x.bin (M, K) fp32, scales.bin (N) bf16, bias.bin (N)
// or none -> out.bin (M, N)
static void run_int8_packed_linear(const Case &c) {
    const int64_t M = c.int_arg("M"), K = c.int_arg("K"), N = c.int_arg("N");
    std::vector<uint8_t> packed(int8_packed_bytes(N, K));
    int8_pack(c.read<int8_t>("weight.bin").data(), N, K, packed.data());
    std::vector<float> out(M * N);
    const auto x = c.read<float>("x.bin"), bias = c.read<float>("bias.bin", true);
    int8_packed_linear(x.data(), M, K, packed.data(), c.read<uint16_t>("scales.bin").data(), N, or_null(bias), out.data(), THREADS);
    c.write("packed.bin", packed), c.write("out.bin", out);
}

// x.bin (M, K) fp32, weight.bin (N, K) int8, scales.bin (N) bf16, bias.bin (N) or none -> out.bin (M, N)
static void run_int8_linear(const Case &c) {
    const int64_t M = c.int_arg("M"), K = c.int_arg("K"), N = c.int_arg("N");
    std::vector<float> out(M * N);
    const auto x = c.read<float>("x.bin"), bias = c.read<float>("bias.bin", true);
    int8_linear(x.data(), M, K, c.read<int8_t>("weight.bin").data(), c.read<uint16_t>("scales.bin").data(), N, or_null(bias),
                out.data(), THREADS);
    c.write("out.bin", out);
}

// x.bin (M, D), weight.bin (D) fp32 -> out.bin (M, D)
static void run_rms_norm(const Case &c) {
    const int64_t M = c.int_arg("M"), D = c.int_arg("D");
    std::vector<float> out(M * D);
    rms_norm(c.read<float>("x.bin").data(), M, D, c.read<float>("weight.bin").data(), float(c.arg("eps")), float(c.arg("unit_offset")),
             out.data());
    c.write("out.bin", out);
}

// gate_up.bin (M, 2F) fp32 -> out.bin (M, F)
static void run_gated_act(const Case &c) {
    const int64_t M = c.int_arg("M"), F = c.int_arg("F");
    std::vector<float> out(M * F);
    gated_act(c.read<float>("gate_up.bin").data(), M, F, int(c.int_arg("gelu")), out.data());
    c.write("out.bin", out);
}

// q.bin (nh hd), k.bin, v.bin (n_kv hd), cos.bin, sin.bin (hd), q_norm.bin, k_norm.bin (hd) or none, fp32;
// k_cache.bin, v_cache.bin (n_kv, S, hd) fp32, or fp16 bits with kv_half=1 -> out.bin (nh hd), and the caches
// after the new key and value were written: k_cache_out.bin, v_cache_out.bin
static void run_attend_decode(const Case &c) {
    const int64_t nh = c.int_arg("nh"), n_kv = c.int_arg("n_kv"), hd = c.int_arg("hd"), S = c.int_arg("S");
    const int kv_half = int(c.int_arg("kv_half"));
    auto k_cache = c.read<uint8_t>("k_cache.bin"), v_cache = c.read<uint8_t>("v_cache.bin");  // bytes, either element type
    const auto q_norm = c.read<float>("q_norm.bin", true), k_norm = c.read<float>("k_norm.bin", true);
    std::vector<float> out(nh * hd);
    attend_decode(c.read<float>("q.bin").data(), c.read<float>("k.bin").data(), c.read<float>("v.bin").data(), nh, n_kv, hd,
                  c.read<float>("cos.bin").data(), c.read<float>("sin.bin").data(), hd, or_null(q_norm), or_null(k_norm), float(c.arg("eps")),
                  k_cache.data(), v_cache.data(), kv_half, S, c.int_arg("pos"), c.int_arg("begin"), float(c.arg("scale")), 0.f,
                  out.data(), THREADS);
    c.write("out.bin", out), c.write("k_cache_out.bin", k_cache), c.write("v_cache_out.bin", v_cache);
}

static const std::map<std::string, void (*)(const Case &)> KERNELS = {
    {"int4_linear", run_int4_linear}, {"int4_linear_gguf", run_int4_linear_gguf}, {"int8_packed_linear", run_int8_packed_linear}, {"int8_linear", run_int8_linear},
    {"rms_norm", run_rms_norm},       {"gated_act", run_gated_act},                   {"attend_decode", run_attend_decode},
};

int main(int argc, char **argv) {
    try {
        for (int i = 1; i < argc; i++) {
            const Case c = read_case(argv[i]);
            auto it = KERNELS.find(c.kernel);
            if (it == KERNELS.end()) throw std::runtime_error(c.dir + ": no kernel " + c.kernel);
            it->second(c);
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "kernel_driver (%s): %s\n", kernel_target(), e.what());
        return 1;
    }
    std::printf("%s\n", kernel_target());  // the test checks it ran the target it built
    return 0;
}
