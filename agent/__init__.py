"""raftmesh.agent"""
