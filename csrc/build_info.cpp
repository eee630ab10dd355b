// What this build of genfast._C contains; setup.py defines GENFAST_WITH_CUDA when it compiles
// the CUDA sources.
namespace genfast {
bool built_with_cuda() {
#ifdef GENFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace genfast
