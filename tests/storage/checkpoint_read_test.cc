// The parsing half of a checkpoint read (storage/checkpoint_read.h) on
// manifests that contradict themselves, as a corrupted store could return
// them: refused as DATA_LOSS before any chunk is placed.
#include "storage/checkpoint_read.h"

#include <gtest/gtest.h>

namespace switchyard::storage {
namespace {

constexpr int64_t kStep = 7;
constexpr char kShard[] = "L0.E1.S0";

// A manifest of one fp32 (2, 8) tensor "w1" in two chunks of 32 bytes.
checkpoint::ShardManifest OneTensor() {
  checkpoint::ShardManifest m;
  m.set_format_version(kCheckpointFormatVersion);
  m.set_step(kStep);
  m.set_shard(kShard);
  auto* t = m.add_tensors();
  t->set_name("w1");
  t->set_dtype(static_cast<uint32_t>(DType::kF32));
  t->add_shape(2);
  t->add_shape(8);
  t->set_bytes(64);
  t->set_chunk_bytes(32);
  t->add_chunk_xxh3(1);
  t->add_chunk_xxh3(2);
  return m;
}

ShardSnapshot Empty() {
  ShardSnapshot s;
  s.shard = kShard;
  s.step = kStep;
  return s;
}

TEST(CheckpointReadTest, PlansChunksWithinTheirTensors) {
  ShardSnapshot snapshot = Empty();
  auto plan = PlanShardRead(OneTensor(), /*allocate=*/true, &snapshot);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  ASSERT_EQ(plan->chunks.size(), 2u);
  EXPECT_TRUE(plan->consistent);
  const char* data =
      static_cast<const char*>(snapshot.tensors[0].tensor.data());
  EXPECT_EQ(plan->chunks[0].dst, data);
  EXPECT_EQ(plan->chunks[1].dst, data + 32);
  EXPECT_EQ(plan->chunks[1].key, CheckpointChunkKey(kStep, kShard, 0, 1));
}

// A tensor the shard does not have (dtype 0) with bytes and chunks: its
// chunks would go to a null pointer (fuzz/checkpoint_manifest_fuzzer).
TEST(CheckpointReadTest, AbsentTensorWithChunksIsDataLoss) {
  checkpoint::ShardManifest m = OneTensor();
  m.mutable_tensors(0)->set_dtype(0);
  m.mutable_tensors(0)->clear_shape();
  ShardSnapshot snapshot = Empty();
  EXPECT_EQ(PlanShardRead(m, /*allocate=*/true, &snapshot).status().code(),
            StatusCode::kDataLoss);
  m.mutable_tensors(0)->set_bytes(0);  // Chunks but no bytes.
  snapshot = Empty();
  EXPECT_EQ(PlanShardRead(m, /*allocate=*/true, &snapshot).status().code(),
            StatusCode::kDataLoss);
}

// Into the caller's tensors: a manifest whose byte count exceeds the
// tensor's shape would place chunks past the tensor's end.
TEST(CheckpointReadTest, BytesBeyondTheReadersTensorAreDataLoss) {
  checkpoint::ShardManifest m = OneTensor();
  m.mutable_tensors(0)->set_bytes(96);
  m.mutable_tensors(0)->add_chunk_xxh3(3);
  ShardSnapshot snapshot = Empty();
  snapshot.tensors.push_back(
      {"w1", Tensor::Zeros(DType::kF32, {2, 8}).value()});
  EXPECT_EQ(PlanShardRead(m, /*allocate=*/false, &snapshot).status().code(),
            StatusCode::kDataLoss);
}

TEST(CheckpointReadTest, ManifestOfAnotherShardOrVersionIsRefused) {
  const std::string bytes = OneTensor().SerializeAsString();
  EXPECT_TRUE(ParseShardManifest(bytes, kStep, kShard).ok());
  EXPECT_EQ(ParseShardManifest(bytes, kStep + 1, kShard).status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(ParseShardManifest(bytes, kStep, "D0").status().code(),
            StatusCode::kDataLoss);
  EXPECT_EQ(ParseShardManifest("\xff", kStep, kShard).status().code(),
            StatusCode::kDataLoss);
  checkpoint::ShardManifest v2 = OneTensor();
  v2.set_format_version(2);
  EXPECT_EQ(
      ParseShardManifest(v2.SerializeAsString(), kStep, kShard).status().code(),
      StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace switchyard::storage
